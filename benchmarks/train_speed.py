"""Training speed and memory of `personalize` DreamBooth against a reference loop.

    python benchmarks/train_speed.py                      # CPU target: bk-sdm-small shape, 256 px, LoRA
    python benchmarks/train_speed.py --models bk-sdm-base --resolution 512 --steps 800   # GPU target

Builds random-weight pipelines of the real shapes (U-Net of bk-sdm-base/small/tiny or sd-v1.4,
the SD-v1 VAE, a CLIP ViT-L/14 text encoder) once in a cache dir, so costs are real without a
download. Every measurement runs in its own subprocess, so peak memory (RSS on CPU,
torch.cuda.max_memory_allocated on GPU) belongs to that measurement alone.

- `ours`: `personalize.dreambooth.train_subject` itself (cached latents and text embeddings, the recipe's
  LoRA, whichever levers the flags set), per-step times from the fit loop.
- `reference`: what the common DreamBooth scripts do each step: VAE-encode the instance and
  class images, run the text encoder, forward/backward, AdamW, `loss.item()` every step; fp32.
- `lever`: the reference loop with one lever changed, to measure levers one at a time.

Prints a table and writes JSON (default benchmarks/results/train_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCH_OF = {"bk-sdm-base": "bk-base", "bk-sdm-small": "bk-small", "bk-sdm-tiny": "bk-tiny", "sd-v1.4": None}
SD_V1_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                 block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215)
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768)


# ------------------------------------------------------------------ building the models
def bench_pipeline(model: str, cache: Path) -> Path:
    """A random-weight pipeline of `model`'s real shape, saved once under `cache`."""
    out = cache / f"bench-{model}"
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from personalize.architectures import SD_V1_UNET_CONFIG, clean_config, get_arch, student_config
    from personalize.backbones import build_tiny_components

    torch.manual_seed(0)
    arch = ARCH_OF[model]
    ucfg = clean_config(SD_V1_UNET_CONFIG) if arch is None else student_config(SD_V1_UNET_CONFIG, get_arch(arch))
    tok = build_tiny_components(0)["tokenizer"]  # byte-level CLIP BPE; its ids are valid for ViT-L/14
    te_cfg = CLIPTextConfig(**CLIP_L14_TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(ucfg), vae=AutoencoderKL(**SD_V1_VAE), text_encoder=CLIPTextModel(te_cfg),
        tokenizer=tok, scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=out.name + "."))
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


def synthetic_photos(folder: Path, n: int, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def cpu_name() -> str:
    """e.g. 'AMD EPYC, 2 cores, AVX2' (the model name and the vector ISA torch dispatches to)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def write_results(out, doc: dict) -> Path:
    """A benchmark's JSON (its folder made), and the line saying where it went."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # this process's own high-water mark: Linux carries ru_maxrss over fork + exec, so a worker spawned by
    # a parent that had just built a 3 GB pipeline would report the parent's peak as its own
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------ workers (one per subprocess)
def patch_ours(lever: str | None) -> None:
    """Our trainer with one lever flipped, in this worker process only (issue 28's A/B): the product
    code stays as it is; whichever lever pays is then made the default there."""
    import contextlib

    import torch

    from personalize import dreambooth, fit

    if lever == "foreach_adamw":
        make = fit.make_optimizer

        def foreach(params, cfg, on_cuda, **kw):
            return make(params, cfg, True, **kw) if fit.optimizer_name(cfg) == "adamw" else make(params, cfg, on_cuda, **kw)
        fit.make_optimizer = foreach
    elif lever == "unfused_adamw":  # the per-tensor AdamW loop, the CPU's optimizer before the fused kernel
        real = fit._adamw_kernel
        fit._adamw_kernel = lambda on_cuda: real(on_cuda) if on_cuda else {"foreach": False}
    elif lever == "channels_last":
        trainables = dreambooth._trainables

        def cl(cfg, comps, device):
            comps["unet"].to(memory_format=torch.channels_last)
            return trainables(cfg, comps, device)
        dreambooth._trainables = cl
    elif lever == "no_uncast":  # peft's own bf16 -> fp32 -> bf16 round trip of each LoRA input
        dreambooth.lora_inputs_uncast = lambda models, autocast: contextlib.nullcontext()
    elif lever == "sdpa_backward":  # SDPA's own bf16 attention backward, not the fp32 one
        dreambooth.fp32_attention_backward = lambda enabled: contextlib.nullcontext()
    elif lever == "conv_kernels":  # every frozen conv through torch's own (oneDNN) kernel, none as a GEMM
        dreambooth.frozen_convs_as_gemm = lambda model: contextlib.nullcontext(0)
    elif lever == "heap_mmap":  # glibc's own policy while training: big blocks mmapped, the heap trimmed
        dreambooth.reuse_freed_memory = lambda enabled: contextlib.nullcontext(False)
    elif lever == "threads_1":
        torch.set_num_threads(1)


def worker_ours(a) -> dict:
    from personalize.config import TrainConfig
    from personalize.dreambooth import train_subject

    opts = set(a.lever.split("+")) if a.lever else set()  # an option, or several joined by '+'
    for o in opts:
        patch_ours(o)

    work = Path(a.workdir)
    photos = synthetic_photos(work / "photos", 4, a.resolution)
    cfg = TrainConfig(method=a.method, subject=str(photos), class_noun="dog", base=a.base, steps=a.warmup + a.steps,
                      resolution=a.resolution, class_images=a.class_images if a.prior else 0,
                      class_image_steps=a.class_image_steps, class_image_batch_size=max(1, a.class_images),
                      mixed_precision=("bf16" if "bf16" in opts else "no" if opts & {"fp32", "cpu_half_weights"}
                                       else a.mixed_precision),
                      gradient_checkpointing=a.gradient_checkpointing or "gradient_checkpointing" in opts,
                      cpu_half_weights="cpu_half_weights" in opts, release_freed_memory="release_freed_memory" in opts,
                      use_8bit_adam=a.use_8bit_adam, base_quantization=a.base_quantization,
                      checkpoint_every=0, validation_images=0,
                      log_every=max(10, a.steps), rank=16, text_encoder_rank=16, output_dir=str(work / "run"))
    run_dir = train_subject(cfg, log=lambda s: None, progress=False, profile_steps=True)
    meta = json.loads((run_dir / "run.json").read_text())
    st = meta["stats"]
    times = st["step_seconds"][a.warmup:]
    ci = meta["class_images"]
    return {"s_per_step": statistics.median(times), "step_seconds": times, "peak_mb": peak_memory_mb(),
            "precision": st["mixed_precision"], "load_s": st["load_seconds"], "cache_s": st["cache_seconds"],
            "class_image_s_per_image": (ci["seconds"] / ci["generated_now"]) if ci.get("generated_now") else None}


def worker_reference(a, lever: str | None = None) -> dict:
    """The per-step work of the common DreamBooth scripts, optionally with one lever changed."""
    import torch
    import torch.nn.functional as F

    from personalize.adapters import add_lora
    from personalize.config import TrainConfig
    from personalize.data import load_training_images
    from personalize.diffusion import noise_latents
    from personalize.sources import load_components
    from personalize.subjects import list_images

    levers = set(lever.split("+")) if lever else set()  # a lever, or several joined by '+'
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    c = load_components(Path(a.base))
    load_s = time.perf_counter() - t0
    unet, te, vae, tok, sched = c["unet"], c["text_encoder"], c["vae"], c["tokenizer"], c["noise_scheduler"]
    cfg = TrainConfig(method="lora", subject="x", rank=16, text_encoder_rank=16, seed=1234)
    if a.method == "lora":
        add_lora(unet, te, cfg)
    else:
        unet.requires_grad_(True)
        te.requires_grad_(True)
        vae.requires_grad_(False)
    for m in (unet, te, vae):
        m.to(dev)
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
    if "channels_last" in levers:
        unet.to(memory_format=torch.channels_last)
    if "torch_compile" in levers:
        unet = torch.compile(unet)  # inductor; the first steps pay the compilation (first_step_s)
    if "classic_attention" in levers:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    params = [p for m in (unet, te) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=("foreach_adamw" in levers) or None)
    photos = synthetic_photos(Path(a.workdir) / "photos", 4, a.resolution)
    pix = load_training_images(list_images(photos), a.resolution).to(dev)
    ids = tok(["a sks dog", "a dog"] if a.prior else ["a sks dog"], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids.to(dev)
    g = torch.Generator(dev).manual_seed(0)
    n = 2 if a.prior else 1
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=("bf16_autocast" in levers))
    cached = None
    if "cached_latents" in levers:
        with torch.no_grad():
            cached = vae.encode(pix).latent_dist
    times = []
    for step in range(a.warmup + a.steps):
        ts = time.perf_counter()
        idx = torch.randint(0, pix.shape[0], (n,), generator=g, device=dev)
        with amp:
            with torch.no_grad():
                if cached is not None:
                    lat = cached.mean[idx] + cached.std[idx] * torch.randn(cached.mean[idx].shape, generator=g, device=dev)
                else:
                    lat = vae.encode(pix[idx]).latent_dist.sample(generator=g)
            lat = lat * vae.config.scaling_factor
            if "channels_last" in levers:
                lat = lat.contiguous(memory_format=torch.channels_last)
            x = noise_latents(sched, lat, g)  # the trainers' own noise/target step
            emb = te(ids)[0]
            pred = unet(x.noisy, x.timesteps, emb).sample.float()
        loss = F.mse_loss(pred[:1], x.target[:1]) + (F.mse_loss(pred[1:], x.target[1:]) if a.prior else 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if "no_host_sync" not in levers:
            loss.item()  # the scripts log the loss every step
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - ts)
    return {"s_per_step": statistics.median(times[a.warmup:]), "step_seconds": times[a.warmup:], "first_step_s": times[0],
            "peak_mb": peak_memory_mb(), "precision": "bf16" if "bf16_autocast" in levers else "no",
            "load_s": load_s, "cache_s": None, "class_image_s_per_image": None}


# ------------------------------------------------------------------ driver
LEVERS = ["cached_latents", "bf16_autocast", "channels_last", "classic_attention", "foreach_adamw", "no_host_sync",
          "torch_compile"]
# our trainer with one option changed: the memory levers, each traded against step time, and the precision
OURS_OPTIONS = ["gradient_checkpointing", "cpu_half_weights", "bf16", "fp32", "foreach_adamw", "channels_last",
                "no_uncast", "threads_1", "release_freed_memory", "sdpa_backward",
                "conv_kernels", "unfused_adamw", "heap_mmap"]


def kind_has_quant(method: str) -> bool:
    return method != "full"  # a full run trains the whole base: nothing frozen to quantize


def run_worker(args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bk-sdm-small", help=f"comma list of {', '.join(ARCH_OF)}")
    p.add_argument("--methods", default="lora", help="lora,full")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True, help="1 class image per step")
    p.add_argument("--steps", type=int, default=10, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--class-images", type=int, default=2, help="class images generated to time generation")
    p.add_argument("--class-image-steps", type=int, default=25)
    p.add_argument("--mixed-precision", default="auto", help="ours: auto (as personalize: fp16 on CUDA; bf16 on CPUs with native bf16, else fp32), no, bf16, fp16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="both loops (default off: memory does not need it at these settings)")
    p.add_argument("--use-8bit-adam", action="store_true", help="ours: bitsandbytes AdamW8bit (CUDA)")
    p.add_argument("--base-quantization", default="none",
                   help="ours: comma list of none, int8, nf4 (QLoRA's frozen base), each with every --options row")
    p.add_argument("--levers", default="", help=f"also measure the reference with one lever each (or several joined by '+', e.g. "
                        f"bf16_autocast+torch_compile): {','.join(LEVERS)} or all")
    p.add_argument("--options", default="", help=f"also measure ours with one option on each (or several joined by '+', e.g. "
                        f"fp32+release_freed_memory): {','.join(OURS_OPTIONS)} or all")
    p.add_argument("--cache-dir", default=os.environ.get("PERSONALIZE_BENCH_CACHE", str(Path.home() / ".cache/personalize/bench")))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/train_speed.json"))
    p.add_argument("--worker", choices=["ours", "reference", "lever"], help=argparse.SUPPRESS)
    p.add_argument("--lever", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        import torch

        from personalize.precision import resolve_mixed_precision

        # the product's default, resolved as `personalize` does (fp16 on CUDA; bf16 on CPUs with native bf16)
        a.mixed_precision = resolve_mixed_precision(a.mixed_precision, cpu=not torch.cuda.is_available())
        res = worker_ours(a) if a.worker == "ours" else worker_reference(a, a.lever)
        print(json.dumps(res))
        return 0

    import torch

    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    from personalize.precision import cpu_bf16_is_native

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()
    slow_bf16 = not torch.cuda.is_available() and not cpu_bf16_is_native()
    settings = {k: getattr(a, k) for k in ("resolution", "prior", "steps", "warmup", "class_images", "class_image_steps",
                                           "mixed_precision", "gradient_checkpointing", "use_8bit_adam",
                                           "base_quantization")}
    results = []
    load_start = os.getloadavg()  # the machine's load: s/step is comparable only on an idle machine
    levers = LEVERS if a.levers == "all" else [x for x in a.levers.split(",") if x]
    options = OURS_OPTIONS if a.options == "all" else [x for x in a.options.split(",") if x]
    for model in a.models.split(","):
        t0 = time.perf_counter()
        base = bench_pipeline(model, cache)
        print(f"[{model}] pipeline ready in {time.perf_counter() - t0:.1f}s: {base}", file=sys.stderr)
        for method in a.methods.split(","):
            quants = a.base_quantization.split(",") if kind_has_quant(method) else ["none"]
            plan = ([("ours", None, q) for q in quants] + [("ours", o, q) for o in options for q in quants]
                    + [("reference", None, "none")] + [("lever", lv, "none") for lv in levers])
            for kind, lever, quant in plan:
                if slow_bf16 and ("bf16_autocast" in (lever or "") or (kind == "ours" and "bf16" in (a.mixed_precision, lever))):
                    # emulated bf16 would take hours here; benchmarks/cpu_bf16.py measures the cost
                    results.append({"model": model, "method": method, "impl": kind if not lever else f"reference+{lever}",
                                    "error": "skipped: no native bf16 on this CPU (see cpu_bf16.py)"})
                    continue
                with tempfile.TemporaryDirectory() as work:
                    env = {**os.environ, "PERSONALIZE_CACHE": str(Path(work) / "cache"), "HF_HUB_OFFLINE": "1"}
                    args = ["--worker", kind, "--base", str(base), "--method", method, "--workdir", work,
                            "--resolution", str(a.resolution), "--steps", str(a.steps), "--warmup", str(a.warmup),
                            "--class-images", str(a.class_images), "--class-image-steps", str(a.class_image_steps),
                            "--mixed-precision", a.mixed_precision,
                            "--prior" if a.prior else "--no-prior",
                            "--gradient-checkpointing" if a.gradient_checkpointing else "--no-gradient-checkpointing"]
                    if lever:
                        args += ["--lever", lever]
                    if a.use_8bit_adam and kind == "ours":
                        args += ["--use-8bit-adam"]
                    if kind == "ours":
                        args += ["--base-quantization", quant]
                    print(f"[{model}] {method} {kind} {lever or ''} {quant} ...", file=sys.stderr)
                    r = run_worker(args, env)
                impl = {"ours": "ours", "reference": "reference", "lever": "reference"}[kind]
                results.append({"model": model, "method": method, "base_quantization": quant,
                                "impl": impl + (f"+{lever}" if lever else "") + (f"+{quant}" if quant != "none" else ""),
                                **r})
    print_table(results)
    write_results(a.out, {"device": device, "torch": torch.__version__, "settings": settings, "results": results,
                          "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
                          "date": time.strftime("%Y-%m-%d %H:%M")})
    return 0


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="DreamBooth training step (x ref: over the reference loop of the same model and method)")
    for c in ("model", "method", "impl", "precision", "s/step", "x ref", "peak MB", "x ref", "load s", "cache s", "class img s"):
        t.add_column(c)
    ref = {(r["model"], r["method"]): r for r in results if r["impl"] == "reference" and "error" not in r}
    for r in results:
        if "error" in r:
            t.add_row(r["model"], r["method"], r["impl"], "", "error: " + r["error"][:60], *[""] * 6)
            continue
        b = ref.get((r["model"], r["method"]))

        def fmt(x, d=2):
            return "" if x is None else f"{x:.{d}f}"

        t.add_row(r["model"], r["method"], r["impl"], r.get("precision", ""), fmt(r["s_per_step"], 3),
                  fmt(r["s_per_step"] / b["s_per_step"]) if b else "", fmt(r["peak_mb"], 0),
                  fmt(r["peak_mb"] / b["peak_mb"]) if b else "", fmt(r["load_s"]), fmt(r["cache_s"]),
                  fmt(r["class_image_s_per_image"]))
    Console(width=180).print(t)


if __name__ == "__main__":
    sys.exit(main())
