"""Seconds per image of `distill eval`'s generation (the BK-SDM MS-COCO protocol: PNDM, 25 steps,
guidance 7.5) for a backbone *shape* with random weights, so a user can size a 30K run.

    python benchmarks/coco_generation.py                         # bk-sdm-small shape, 256 + 512 px, CPU
    python benchmarks/coco_generation.py --device cuda --dtype fp16 --resolutions 512 --batch-size 8 --images 16

It times the parts of one image (text encoding of prompt + empty prompt, one guided U-Net step =
a batch-2 U-Net call, one VAE decode) and a real pipeline call with `--check-steps` steps, and
prints s/image = text + 25 x step + decode (the pipeline call checks that sum). Writes
benchmarks/results/coco_generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_pipeline(name: str, dtype, device):
    """A random-weight pipeline of the registry backbone `name`'s real shapes."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from personalize.architectures import ARCHS, TEACHER_UNET_CONFIGS, clean_config, student_config
    from personalize.backbones import BACKBONES, build_tiny_components
    from personalize.cost import FAMILY_TEXT_CONFIGS, REGISTRY_ARCHS, SD_VAE_CONFIG

    teacher, arch = REGISTRY_ARCHS[name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(clean_config(student_config(TEACHER_UNET_CONFIGS[teacher], ARCHS[arch])))
    text = CLIPTextModel(CLIPTextConfig(**FAMILY_TEXT_CONFIGS[BACKBONES[name].family]))
    vae = AutoencoderKL.from_config(SD_VAE_CONFIG)
    tok = build_tiny_components()["tokenizer"]  # byte-level CLIP BPE: same 77-token sequences, no download
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="bk-sdm-small")
    p.add_argument("--resolutions", default="256,512")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--check-steps", type=int, default=2, help="steps of the real pipeline call (0: skip)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "coco_generation.json"))
    a = p.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pipe = build_pipeline(a.backbone, dtype, device)
    b = a.batch_size
    rows = []
    for res in [int(r) for r in a.resolutions.split(",")]:
        side = res // 8
        with torch.inference_mode():
            ids = torch.zeros(2 * b, 77, dtype=torch.long, device=device)
            t_text = timed(lambda: pipe.text_encoder(ids), a.repeats, sync)
            lat = torch.randn(2 * b, 4, side, side, device=device, dtype=dtype)
            ctx = torch.randn(2 * b, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
            t_step = timed(lambda: pipe.unet(lat, torch.tensor(500, device=device), ctx), a.repeats, sync)
            z = torch.randn(b, 4, side, side, device=device, dtype=dtype)
            t_dec = timed(lambda: pipe.vae.decode(z), a.repeats, sync)
            check = None
            if a.check_steps:
                gens = [torch.Generator("cpu").manual_seed(i) for i in range(b)]
                t = time.perf_counter()
                pipe(["a photo of a cat"] * b, num_inference_steps=a.check_steps, guidance_scale=7.5, height=res,
                     width=res, generator=gens)
                sync()
                check = time.perf_counter() - t
        per_image = (t_text + 25 * t_step + t_dec) / b
        predicted_check = (t_text + a.check_steps * t_step + t_dec) / b if a.check_steps else None
        rows.append({"resolution": res, "batch_size": b, "text_s": t_text, "guided_unet_step_s": t_step,
                     "vae_decode_s": t_dec, "s_per_image_25_steps": per_image,
                     "check_steps": a.check_steps, "check_pipeline_s_per_image": check / b if check else None,
                     "check_predicted_s_per_image": predicted_check,
                     "hours_for_30k": per_image * 30_000 / 3600})
    env = {"backbone": a.backbone, "device": str(device), "dtype": a.dtype, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "load": os.getloadavg(), "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None}
    print(f"{a.backbone} shape, {a.device} {a.dtype}, batch {b}, torch {torch.__version__}, "
          f"{env['threads']} threads, load {env['load'][0]:.1f}")
    print("| px | text (s) | guided U-Net step (s) | VAE decode (s) | s/image, 25 steps | 30K images (h) | "
          f"pipeline, {a.check_steps} steps: measured / predicted (s/image) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        chk = (f"{r['check_pipeline_s_per_image']:.1f} / {r['check_predicted_s_per_image']:.1f}"
               if r["check_pipeline_s_per_image"] else "-")
        print(f"| {r['resolution']} | {r['text_s']:.2f} | {r['guided_unet_step_s']:.2f} | {r['vae_decode_s']:.2f} | "
              f"{r['s_per_image_25_steps']:.1f} | {r['hours_for_30k']:.0f} | {chk} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
