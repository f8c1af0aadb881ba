"""Evaluation: the DreamBooth protocol scores (`protocol`), the frozen feature extractors
(`evaluators`), the metric math as pure functions (`metrics`), and the multi-run `report`."""
