"""personalize: DreamBooth (full and LoRA) on compressed BK-SDM Stable Diffusion backbones."""

__version__ = "0.1.0"
