"""Adapter methods side by side: trainable parameters, adapter file size, s/step and peak memory of
every adapter method (personalize.defaults.ADAPTER_METHOD_NAMES: LoRA, DoRA, LoHa, LoKr, OFT, BOFT,
HRA), each trained by `personalize.dreambooth.train_subject` (the same
path as `personalize <method>`) with its defaults, on a random-weight pipeline of a real shape.

    python benchmarks/methods.py                       # CPU: bk-sdm-small shape, 256 px, 3 timed steps
    python benchmarks/methods.py --model bk-sdm-small --resolution 512 --steps 20   # GPU command

Each method runs in its own subprocess (peak memory = RSS on CPU, torch.cuda.max_memory_allocated
on GPU, of that run alone); prior preservation is off (it doubles the batch for every method alike).
Prints a table and writes JSON (default benchmarks/results/methods.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from personalize.defaults import ADAPTER_METHOD_NAMES  # noqa: E402 - after the path above

METHODS = list(ADAPTER_METHOD_NAMES)


def adapter_stats(run_dir: Path) -> tuple[int, int]:
    """(parameters, bytes) of the run's saved adapter, every file of it."""
    from safetensors import safe_open

    files = [p for p in run_dir.rglob("*.safetensors") if "checkpoints" not in p.parts]
    params = 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            params += sum(_numel(h.get_slice(k).get_shape()) for k in h.keys())
    size = sum(p.stat().st_size for p in files) + sum(p.stat().st_size for p in run_dir.rglob("adapter_config.json"))
    return params, size


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def worker(a) -> dict:
    from train_speed import peak_memory_mb, synthetic_photos

    from personalize.config import TrainConfig
    from personalize.dreambooth import train_subject

    if a.peft_forwards:  # the A/B of orthogonal_inputs: HRA and BOFT layers on peft's own forward
        import contextlib

        from personalize import dreambooth

        dreambooth.orthogonal_on_inputs = lambda models: contextlib.nullcontext(0)
    work = Path(a.workdir)
    photos = synthetic_photos(work / "photos", 4, a.resolution)
    cfg = TrainConfig(method=a.method, subject=str(photos), class_noun="dog", base=a.base, steps=a.warmup + a.steps,
                      resolution=a.resolution, class_images=0, checkpoint_every=0, validation_images=0,
                      log_every=max(10, a.steps), output_dir=str(work / "run"))
    run_dir = train_subject(cfg, log=lambda s: None, progress=False, profile_steps=True)
    st = json.loads((run_dir / "run.json").read_text())["stats"]
    params, size = adapter_stats(run_dir)
    return {"method": a.method, "trainable_params": params, "adapter_bytes": size,
            "s_per_step": statistics.median(st["step_seconds"][a.warmup:]), "peak_mb": peak_memory_mb(),
            "precision": st["mixed_precision"], "device": st["device"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bk-sdm-small", help="bk-sdm-base, bk-sdm-small, bk-sdm-tiny or sd-v1.4 shape")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("PERSONALIZE_BENCH_CACHE",
                                                                   Path.home() / ".cache/personalize/bench")),
                   help="where the random-weight pipelines are kept (train_speed.py's --cache-dir)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods.json")
    p.add_argument("--peft-forwards", action="store_true",
                   help="HRA and BOFT layers on peft's own forward (the A/B of personalize/orthogonal_inputs.py)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a)))
        return 0

    from train_speed import bench_pipeline, cpu_name

    a.cache.mkdir(parents=True, exist_ok=True)
    base = bench_pipeline(a.model, a.cache)
    rows = []
    for m in a.methods.split(","):
        with tempfile.TemporaryDirectory(dir=a.cache) as work:
            cmd = [sys.executable, __file__, "--worker", "--method", m, "--base", str(base), "--workdir", work,
                   "--resolution", str(a.resolution), "--steps", str(a.steps), "--warmup", str(a.warmup),
                   *(["--peft-forwards"] if a.peft_forwards else [])]
            r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(line[0][7:]))
            print(f"{m}: {json.dumps(rows[-1])}", file=sys.stderr)  # kept if a later method is cut short
    print(f"\n{a.model} shape, {a.resolution} px, batch 1, no prior preservation, {a.steps} timed steps"
          f"{'; HRA/BOFT on peft' + chr(39) + 's forward' if a.peft_forwards else ''}; {cpu_name()}\n")
    print("| method | trainable params | adapter file | s/step | peak memory |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable_params'] / 1e6:.2f} M | {r['adapter_bytes'] / 2**20:.1f} MiB | "
              f"{r['s_per_step']:.2f} | {r['peak_mb'] / 1024:.2f} GiB |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "resolution": a.resolution, "steps": a.steps,
                                 "peft_forwards": a.peft_forwards,
                                 "machine": cpu_name(), "rows": rows}, indent=2))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
