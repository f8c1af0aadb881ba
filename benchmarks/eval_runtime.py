"""A whole `personalize eval` of one subject, its protocol images drawn by torch or by OpenVINO.

A LoRA run (1 step) on a random-weight pipeline of a real shape (train_speed.py's), then, each in a
fresh process and timed from the command to its exit:

1. `personalize eval RUN --runtime torch` (CPU default: torch in fp32, as `generate` draws there),
   and with `--dtype bf16`;
2. `personalize eval RUN --runtime openvino`, first call: exports the run (LoRA fused) into the
   personalize cache, then draws (bf16 where the CPU has it natively);
3. the same again with its images deleted: the export is kept, so this is the drawing alone.

The evaluators are tiny random DINO/CLIP models (the real ones are not downloadable here), so the
scoring part of each row is understated; it is the same in every row. Prints a table, writes JSON.

    python benchmarks/eval_runtime.py                                    # 256 px, 25 images of 10 steps
    python benchmarks/eval_runtime.py --resolution 512 --images-per-prompt 4 --steps 25   # the protocol
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bk-sdm-small", help="bk-sdm-base, bk-sdm-small, bk-sdm-tiny or sd-v1.4 shape")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("PERSONALIZE_BENCH_CACHE",
                                                                   Path.home() / ".cache/personalize/bench")))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_runtime.json"))
    a = p.parse_args()

    from _metric_fixtures import build_tiny_clip, build_tiny_dino
    from train_speed import bench_pipeline, cpu_name, synthetic_photos, write_results

    a.cache.mkdir(parents=True, exist_ok=True)
    base = bench_pipeline(a.model, a.cache)
    rows = []
    with tempfile.TemporaryDirectory(dir=a.cache) as work:
        work = Path(work)
        env = {**os.environ, "PERSONALIZE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
        photos = synthetic_photos(work / "photos", 4, a.resolution)
        run = work / "run"
        cli = [sys.executable, "-m", "personalize"]
        timed([*cli, "lora", "--subject", str(photos), "--class-noun", "dog", "--base", str(base), "--steps", "1",
               "--resolution", str(a.resolution), "--class-images", "0", "--validation-images", "0",
               "--output-dir", str(run)], env)
        ev = [*cli, "eval", str(run), "--dino", str(build_tiny_dino(work / "dino")),
              "--clip", str(build_tiny_clip(work / "clip")), "--images-per-prompt", str(a.images_per_prompt),
              "--steps", str(a.steps), "--device", "cpu"]
        n = 25 * a.images_per_prompt
        for name, extra in (("torch (fp32, the CPU default)", ["--runtime", "torch"]),
                            ("torch --dtype bf16", ["--runtime", "torch", "--dtype", "bf16"]),
                            ("openvino, first call (export + draw)", ["--runtime", "openvino"]),
                            ("openvino, export kept (draw)", ["--runtime", "openvino"])):
            shutil.rmtree(run / "eval", ignore_errors=True)  # every row draws all its images
            s = timed([*ev, *extra], env)
            rows.append({"runtime": name, "seconds": s, "images": n, "s_per_image": s / n})
            print(f"{name}: {s:.1f} s", file=sys.stderr)
    ref = rows[0]["seconds"]
    print(f"\n{cpu_name()}, {a.model} shape, {a.resolution} px, {n} images x {a.steps} steps\n")
    print("| eval of one subject | s | s/image | x torch |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['runtime']} | {r['seconds']:.1f} | {r['s_per_image']:.2f} | {r['seconds'] / ref:.2f} |")
    write_results(a.out, {"cpu": cpu_name(), "model": a.model, "resolution": a.resolution, "images": n,
                          "steps": a.steps, "load_avg": os.getloadavg(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
