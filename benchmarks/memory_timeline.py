"""Resident memory through one training run, sampled every 20 ms, with the run's phases marked.

Where a peak comes from (loading, class images, the latent cache, the steps) and whether it is live
memory or what glibc's heap kept. One `train_subject` LoRA run in this process on the random-weight
pipeline of a real shape (train_speed.py's), 1 class image; prints the phase marks, the peak and the
largest RSS of each second, and writes JSON.

    python benchmarks/memory_timeline.py                                  # auto precision, 3 steps
    python benchmarks/memory_timeline.py --mixed-precision no --base-quantization nf4 --release-freed-memory
    python benchmarks/memory_timeline.py --steps 6 --conv-kernels    # no conv as a GEMM (gemm_convs.py)
    python benchmarks/memory_timeline.py --steps 6 --sdpa-backward   # SDPA's own bf16 attention backward
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/memory_timeline.py   # glibc's heap out of the picture
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_speed import bench_pipeline, cpu_name, synthetic_photos, write_results  # noqa: E402

PHASES = ("_load_base", "_class_images", "build_cache", "_trainables", "_finish")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bk-sdm-small")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--base-quantization", default="none")
    for flag in ("cpu-half-weights", "release-freed-memory"):
        p.add_argument(f"--{flag}", action="store_true")
    p.add_argument("--conv-kernels", action="store_true", help="every frozen conv through torch's own kernel")
    p.add_argument("--sdpa-backward", action="store_true",
                   help="SDPA's own attention backward, not attention_backward.py's fp32 one")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("PERSONALIZE_BENCH_CACHE",
                                                                   Path.home() / ".cache/personalize/bench")))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_timeline.json"))
    a = p.parse_args()

    from personalize import dreambooth
    from personalize.config import TrainConfig

    import contextlib

    if a.conv_kernels:
        dreambooth.frozen_convs_as_gemm = lambda model: contextlib.nullcontext(0)
    if a.sdpa_backward:
        dreambooth.fp32_attention_backward = lambda enabled: contextlib.nullcontext()
    base = bench_pipeline(a.model, a.cache)
    samples, marks = [], []
    t0 = time.perf_counter()

    def sample():
        while True:
            samples.append((time.perf_counter() - t0, rss_mb()))
            time.sleep(0.02)

    def marked(name, fn):
        def run(*args, **kw):
            marks.append((time.perf_counter() - t0, rss_mb(), f"begin {name}"))
            out = fn(*args, **kw)
            marks.append((time.perf_counter() - t0, rss_mb(), f"end {name}"))
            return out
        return run

    for name in PHASES:  # the run's named phases (dreambooth._train)
        setattr(dreambooth, name, marked(name, getattr(dreambooth, name)))
    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory(dir=a.cache) as work:
        photos = synthetic_photos(Path(work) / "photos", 4, a.resolution)
        cfg = TrainConfig(method="lora", subject=str(photos), class_noun="dog", base=str(base), steps=a.steps,
                          resolution=a.resolution, class_images=1, class_image_steps=10, class_image_batch_size=1,
                          mixed_precision=a.mixed_precision, base_quantization=a.base_quantization,
                          cpu_half_weights=a.cpu_half_weights, release_freed_memory=a.release_freed_memory,
                          checkpoint_every=0, validation_images=0,
                          log_every=1, rank=16, text_encoder_rank=16, output_dir=str(Path(work) / "run"))
        dreambooth.train_subject(cfg, log=lambda s: None, progress=False)
    time.sleep(0.1)
    peak = max(samples, key=lambda s: s[1])
    per_second: dict[int, float] = {}
    for t, r in samples:
        per_second[int(t)] = max(per_second.get(int(t), 0.0), r)
    print(f"{cpu_name()}; {a.model} shape, {a.resolution} px, {a.steps} steps, {vars(a)}")
    for t, r, what in marks:
        print(f"{t:7.2f} s {r:7.0f} MB  {what}")
    print(f"peak {peak[1]:.0f} MB at {peak[0]:.1f} s")
    print("largest RSS per second: " + " ".join(f"{k}:{v:.0f}" for k, v in sorted(per_second.items())))
    write_results(a.out, {"cpu": cpu_name(), "settings": {k: str(v) for k, v in vars(a).items()},
                          "peak_mb": peak[1], "marks": marks, "per_second_mb": per_second})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
