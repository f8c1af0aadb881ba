"""Defaults shared by the CLI and the heavy modules, kept here so that building the argument
parser (and `--help`) imports no torch, diffusers or transformers. Plain data only."""

# DPM-Solver++ with 25 steps and guidance 7.5, as the BK-SDM generation scripts
DEFAULT_SCHEDULER = "dpm++"
SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
DEFAULT_STEPS = 25  # the BK-SDM generation scripts: DPM-Solver, 25 steps
DEFAULT_GUIDANCE = 7.5  # Stable Diffusion's default classifier-free guidance
DEFAULT_SEED = 0

# the DreamBooth paper's evaluators (section 4.1)
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"

# the training loop's choices (personalize/fit.py): diffusers' get_scheduler names, and optimizers
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
