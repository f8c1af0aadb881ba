"""`personalize generate` and `personalize export`: flags -> personalize.generate / personalize.export."""

from __future__ import annotations

from pathlib import Path

from ..argtypes import float_list, number, resolution
from ..defaults import (ADAPTER_METHOD_NAMES, COREML_ATTENTION, COREML_NBITS, DEFAULT_GUIDANCE,
                        DEFAULT_SCHEDULER, DEFAULT_SEED, DEFAULT_STEPS, DEPLOY_FORMATS, DTYPES,
                        EXPORT_FORMATS, INFERENCE_PRECISIONS, KOHYA_NAMES, OPENVINO_WEIGHT_FORMATS, RUNTIMES,
                        SCHEDULERS)
from ..settings import add_settings_flags


# guidance beyond ~30 only saturates; negative values are a sign error, not a setting
GUIDANCE = number(float, 0, 100)
SCALE = number(float, -10, 10)  # an adapter's weight; |w| > a few already breaks images
SEED = number(int, 0, 2**63 - 1)


def nbits(text: str):
    """--quantize-nbits: a palette size in bits, or none (fp16 weights; export.formats.NO_PALETTE)."""
    if text.lower() == "none":
        return "none"
    return number(int, 1, 8)(text)


def _generate(args) -> int:
    from ..generate import collect_prompts, generate_to_dir
    from ..sources import resolve_source

    src = resolve_source(args.run_dir, args.adapter or [], args.adapter_weights, args.base, args.lora_scale,
                         args.scheduler, args.inference_precision)
    templates = collect_prompts(src, args.prompt, args.prompts, args.protocol)
    out, jobs, made = generate_to_dir(
        src, templates, args.out, images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, resolution=args.resolution,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    reused = len(jobs) - made
    print(f"{len(jobs)} image(s) in {out}" + (f" ({reused} already there with the same settings)" if reused else ""))
    return 0


EXPORT_OPTIONS = ("names", "lora_scale", "base", "allow_pickle", "half", "rank", "energy", "resolution",
                  "weight_format", "quantize_nbits", "attention", "vae_encoder", "bundle_resources")


def _export(args) -> int:
    from ..export.formats import export

    r = export(args.run_dir, args.out, args.format, overwrite=args.overwrite,
               **{k: getattr(args, k) for k in EXPORT_OPTIONS})
    if args.format == "lora":
        print(r.summary())
        r = r.path
    if args.format == "single-file":
        for client, verdict in r.clients.items():
            print(f"{client}: {verdict}")
        r = "\n".join(str(p) for p in (r.path, r.yaml, r.readme) if p)
    print(r)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="draw images with a personalized model (LoRA, full, several adapters)",
                       description="Generate images with a run's LoRA on its base, a full run's pipeline, or several "
                                   "LoRA adapters mixed. {token} and {class} in prompts fill in from the run.")
    p.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR",
                   help="a finished lora or full run, an ONNX/OpenVINO export, or a base (tiny, a registry name, a "
                        "pipeline dir: the same as --base)")
    p.add_argument("--adapter", action="append", type=Path, metavar="RUN_DIR",
                   help="a LoRA run to load (repeat to mix several)")
    p.add_argument("--adapter-weights", type=float_list(-10, 10), default=None, metavar="W1,W2",
                   help="one weight per adapter, RUN_DIR first (default 1 each)")
    p.add_argument("--base", default=None, help="generate on this base instead of the one the adapters were trained on")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable), e.g. 'a {token} {class} in the snow'")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="a file with one prompt per line")
    p.add_argument("--protocol", action="store_true", help="the subject's 25 DreamBooth evaluation prompts")
    p.add_argument("-n", "--images-per-prompt", type=number(int, 1, 10_000), default=1, help="images per prompt; image j uses seed+j")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=list(SCHEDULERS),
                   help=f"sampler (default {DEFAULT_SCHEDULER}: DPM-Solver++, as the BK-SDM generation scripts)")
    p.add_argument("--steps", type=number(int, 1, 1000), default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance-scale", type=GUIDANCE, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance (default {DEFAULT_GUIDANCE})")
    p.add_argument("--resolution", type=resolution, default=None, help="px (default: the run's training resolution)")
    p.add_argument("--seed", type=SEED, default=DEFAULT_SEED, help=f"first seed (default {DEFAULT_SEED})")
    p.add_argument("--lora-scale", type=SCALE, default=1.0, help="multiplies every adapter's weight (default 1)")
    p.add_argument("--batch-size", type=number(int, 1, 1024), default=None, help="images per pipeline call (default 8 CUDA, 2 CPU)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--inference-precision", default=None, choices=list(INFERENCE_PRECISIONS),
                   help="OpenVINO exports: compute precision (default fp32, images equal torch's; bf16 only on CPUs "
                        "with native bf16: faster, images a few levels off)")
    p.add_argument("-o", "--out", type=Path, default=None, help="output folder (default RUN_DIR/samples/<time>)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.ckpt weights (trusted sources only)")
    add_settings_flags(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("export", help="export a run: kohya/LyCORIS file, merged pipeline, single-file checkpoint, ONNX/OpenVINO/Core ML",
                       description="kohya: one safetensors file with lora_unet_*/lora_te_* keys and alphas (LyCORIS layouts for "
                                   "LoHa/LoKr/OFT). merged: the adapter fused into a complete diffusers pipeline "
                                   "directory. single-file: one original-SD checkpoint. "
                                   f"{'/'.join(DEPLOY_FORMATS)}: deploy folders (the adapter fused first; also full "
                                   f"runs and distill pipelines); generate runs {'/'.join(RUNTIMES)} ones on CPU.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help=f"a finished adapter run ({', '.join(ADAPTER_METHOD_NAMES)}); single-file and the deploy formats "
                        "also take a full run, a distill output or a pipeline dir")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="single-file: one original-SD checkpoint (ComfyUI / A1111) of a full or LoRA run, "
                        "a distill output or any base")
    p.add_argument("-o", "--out", type=Path, required=True,
                   help=f"file (kohya, single-file) or directory (merged, {', '.join(DEPLOY_FORMATS)})")
    p.add_argument("--lora-scale", type=SCALE, default=None,
                   help="merged/single-file/deploy formats: scale the adapter is fused at (default 1)")
    p.add_argument("--half", action="store_true", default=None, help="single-file: fp16 tensors (half the size)")
    p.add_argument("--names", default=None, choices=KOHYA_NAMES,
                   help="kohya: U-Net key names (default diffusers); ldm = lora_unet_input_blocks_N_... from the "
                        "base's real layout (A1111 on BK-SDM); never mixed in one file")
    p.add_argument("--base", default=None,
                   help="merged/single-file/deploy formats: fuse the adapter into this base instead of the training base")
    # deploy formats (personalize.export.deploy): LoRA fused first; full runs and distill pipelines as they are
    p.add_argument("--weight-format", default=None, choices=OPENVINO_WEIGHT_FORMATS,
                   help="openvino: weights as fp32 (default), fp16 or int8 (NNCF weight compression)")
    p.add_argument("--quantize-nbits", type=nbits, default=None, metavar="{" + ",".join(map(str, COREML_NBITS)) + ",none}",
                   help="coreml: k-means palettization bits (default 6, as Apple's and BK-SDM's published "
                        "Core ML weights); none keeps fp16")
    p.add_argument("--attention", default=None, choices=COREML_ATTENTION,
                   help="coreml: attention layout (default original; split_einsum targets the Neural Engine)")
    p.add_argument("--resolution", type=resolution, default=None,
                   help="deploy formats: the traced (coreml: the fixed) image size, up to 2048 (default the run's training "
                        "resolution)")
    p.add_argument("--vae-encoder", action="store_true", default=None, help="coreml: also VAEEncoder.mlpackage (image-to-image)")
    p.add_argument("--bundle-resources", action="store_true", default=None,
                   help="coreml: also compile .mlmodelc resources for the Swift pipeline (needs macOS + Xcode)")
    p.add_argument("--rank", type=number(int, 1), default=None,
                   help="lora: keep this rank of each weight's change (capped by its own; default 16 unless --energy)")
    p.add_argument("--energy", type=number(float, 0, 1, lo_open=True), default=None,
                   help="lora: keep the smallest rank holding this share of each change's squared singular values "
                        "(with --rank: the smaller)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--allow-pickle", action="store_true", default=None, help="merged/single-file/deploy formats: allow .bin/.ckpt base weights")
    add_settings_flags(p)
    p.set_defaults(func=_export)
