"""Evaluation: the DreamBooth protocol scores (`dreambooth`), the frozen feature extractors
(`evaluators`), the metric math as pure functions (`metrics`), and the multi-run `report`."""
