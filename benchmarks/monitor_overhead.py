"""What in-run monitoring costs: a DreamBooth-LoRA run with and without `--sample-every`,
`--save-every` and `--score-every`, on a random-weight pipeline of a real shape.

    python benchmarks/monitor_overhead.py                              # CPU: bk-sdm-tiny shape, 256 px
    python benchmarks/monitor_overhead.py --model bk-sdm-base --resolution 512 --steps 800 --every 100 \
        --sample-steps 25                                              # GPU: the recipe

Each configuration runs in its own subprocess through `personalize.dreambooth.train_subject`; the
fit loop times every hook call (run.json `stats.monitor_seconds`) and every step. Scoring uses
tiny random evaluators (no download), so its row times the image generation it adds plus a
negligible embedding cost; real DINO ViT-S/16 + CLIP ViT-B/32 add about 0.1 B parameters of
forward passes per scored image. Prints a table and writes JSON (default
benchmarks/results/monitor_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

CONFIGS = {
    "plain": {},
    "samples": {"sample_every": True},
    "save": {"save_every": True},
    "scores": {"score_every": True},
    "all": {"sample_every": True, "save_every": True, "score_every": True},
}


def worker(a) -> dict:
    from train_speed import bench_pipeline, synthetic_photos

    from personalize.config import TrainConfig
    from personalize.dreambooth import train_subject

    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    base = bench_pipeline(a.model, cache)
    work = Path(a.workdir)
    photos = synthetic_photos(work / "photos", 4, a.resolution)
    on = CONFIGS[a.config]
    extra = {}
    if on.get("score_every"):
        from _metric_fixtures import build_tiny_clip, build_tiny_dino

        ev = cache / "tiny-evaluators"
        if not (ev / "clip" / "config.json").is_file():
            build_tiny_dino(ev / "dino")
            build_tiny_clip(ev / "clip")
        extra = {"score_every": a.every, "dino": str(ev / "dino"), "clip": str(ev / "clip")}
    cfg = TrainConfig(method="lora", subject=str(photos), class_noun="dog", base=str(base), steps=a.steps,
                      resolution=a.resolution, class_images=0, checkpoint_every=0, validation_images=0,
                      validation_steps=a.sample_steps, log_every=max(1, a.every),
                      sample_every=a.every if on.get("sample_every") else 0,
                      save_every=a.every if on.get("save_every") else 0, output_dir=str(work / "run"), **extra)
    t0 = time.perf_counter()
    run_dir = train_subject(cfg, log=lambda s: None, progress=False, profile_steps=True)
    wall = time.perf_counter() - t0
    st = json.loads((run_dir / "run.json").read_text())["stats"]
    steps = st["step_seconds"]
    hooks = st.get("monitor_seconds", {})
    return {"config": a.config, "s_per_step": statistics.median(steps), "train_s": sum(steps),
            "hook_s": hooks, "hook_total_s": sum(hooks.values()), "wall_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bk-sdm-tiny", help="bk-sdm-base, bk-sdm-small, bk-sdm-tiny or sd-v1.4 shape")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=10, help="N of --sample-every / --save-every / --score-every")
    p.add_argument("--sample-steps", type=int, default=10, help="denoising steps of each sampled image")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--cache-dir", default=os.environ.get("PERSONALIZE_BENCH_CACHE", str(Path.home() / ".cache/personalize/bench")))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/monitor_overhead.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a)))
        return 0

    from train_speed import cpu_name

    results = []
    for name in a.configs.split(","):
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, __file__, "--worker", "--config", name, "--workdir", work, "--model", a.model,
                   "--resolution", str(a.resolution), "--steps", str(a.steps), "--every", str(a.every),
                   "--sample-steps", str(a.sample_steps), "--cache-dir", a.cache_dir]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(line[-1][7:]))
            print(f"{name}: done", file=sys.stderr)
            write_json(a, results)  # after each: a long run stopped half-way keeps what it measured
    plain = next((r for r in results if r["config"] == "plain"), None)
    print(f"\n{a.model} shape, LoRA, {a.resolution} px, {a.steps} steps, every {a.every}, "
          f"{a.sample_steps} sampling steps; {cpu_name()}; load {os.getloadavg()[0]:.1f}\n")
    print("| config | s/step (median) | hook calls: seconds | hooks total s | overhead vs training |")
    print("|---|---|---|---|---|")
    for r in results:
        calls = ", ".join(f"{k} {v:.1f}" for k, v in r["hook_s"].items()) or "-"
        print(f"| {r['config']} | {r['s_per_step']:.3f} | {calls} | {r['hook_total_s']:.1f} | "
              f"{100 * r['hook_total_s'] / r['train_s']:.0f}% |")
    if plain:
        print(f"\n(s/step of 'plain' {plain['s_per_step']:.3f}: the monitored runs' steps are the same work)")
    return 0


def write_json(a, results: list[dict]) -> None:
    from train_speed import cpu_name

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "resolution": a.resolution, "steps": a.steps, "every": a.every,
                                       "sample_steps": a.sample_steps, "machine": cpu_name(),
                                       "load": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
