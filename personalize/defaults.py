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
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "loraplus")

# the adapter methods, in the order of adapters.ADAPTER_METHODS (a test holds the two together),
# and full finetuning; every list of methods (CLI, batch, report, exports) reads these
ADAPTER_METHOD_NAMES = ("lora", "dora", "loha", "lokr", "oft", "boft", "hra")
METHODS = (*ADAPTER_METHOD_NAMES, "full")
METHOD_LABELS = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "boft": "BOFT", "hra": "HRA",
                 "full": "full"}
# the methods with a rank per module (peft's rank_pattern / alpha_pattern), and the LoRA-file ones
# (--rslora, --optimizer loraplus: both are about LoRA's B A)
RANKED_METHODS = ("lora", "dora", "loha", "lokr")
LORA_FILE_METHODS = ("lora", "dora")

# where prior-preservation class images are drawn (class_images.py)
CLASS_IMAGE_RUNTIMES = ("torch", "openvino")
# what draws eval's protocol images (eval --runtime): the same two ways
EVAL_RUNTIMES = CLASS_IMAGE_RUNTIMES

# export formats: the adapter files, the merged pipeline, one ldm checkpoint, and the deploy runtimes
DEPLOY_FORMATS = ("onnx", "openvino", "coreml")
# lora: any run as a plain LoRA (truncated SVD of each weight's change), or a LoRA run resized
EXPORT_FORMATS = ("kohya", "merged", "single-file", "lora", *DEPLOY_FORMATS)
RUNTIMES = ("onnx", "openvino")  # the deploy formats `personalize generate` runs (Core ML predicts on macOS only)
# `generate --inference-precision`: OpenVINO's CPU compute precision. fp32 (default) gives the torch
# pipeline's images; bf16 (native AVX512-BF16/AMX CPUs only) was 0.32x the best torch CPU time at
# 512 px (benchmarks/RESULTS.md, "Deploy runtimes") at the cost of images a few levels off torch's.
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # ours -> OpenVINO's INFERENCE_PRECISION_HINT
OPENVINO_WEIGHT_FORMATS = ("fp32", "fp16", "int8")  # int8: NNCF weight compression
COREML_NBITS = (1, 2, 3, 4, 6, 8)  # the LUT sizes Core ML's constexpr_lut_to_dense takes
COREML_ATTENTION = ("original", "split_einsum")  # Apple's ml-stable-diffusion attention implementations
KOHYA_NAMES = ("diffusers", "ldm")  # U-Net key names of a kohya export (ldm: the base's real ldm layout)

# precisions: generate's --dtype (auto: fp16 on CUDA, fp32 on CPU) and training's --mixed-precision
# (accelerate's names; auto: fp16 on CUDA as BK-SDM, bf16 on CPUs with native bf16, else no)
DTYPES = ("auto", "fp32", "fp16", "bf16")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# --base-quantization: the frozen base's Linear layers as they are, or in bitsandbytes NF4 / int8 (quantize.py)
BASE_QUANTIZATIONS = ("none", "nf4", "int8")
