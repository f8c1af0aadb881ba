"""CPU seconds per image for the deploy runtimes against torch: a random-weight bk-sdm-small-shaped
pipeline (benchmarks/train_speed.py's), exported with `personalize export --format onnx|openvino`,
then one image (batch 1, classifier-free guidance, DPM-Solver++) per runtime through the same
diffusers loop `personalize generate` runs. Each runtime is timed in its own process (its peak RSS
is its memory); a warm-up call first (kernel selection, graph compilation). openvino-bf16 is the
fp32 IR computed in bf16 (OpenVINO's own CPU default where bf16 is native; `generate` uses f32).

    python benchmarks/deploy_speed.py                          # 256 px, 25 steps
    python benchmarks/deploy_speed.py --resolutions 256,512

Prints a table and writes benchmarks/results/deploy_speed.json. torch bf16 is timed only where the
CPU has native bf16 (personalize.precision.cpu_bf16_is_native); elsewhere it is emulated and slower.
Target (issue 14): OpenVINO at or below 0.5x the best torch CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNTIMES = ("torch-fp32", "torch-bf16", "openvino-fp32", "openvino-bf16", "openvino-int8", "onnx")
EXPORTS = {"onnx": ("onnx", "fp32"), "openvino-fp32": ("openvino", "fp32"), "openvino-int8": ("openvino", "int8")}
SAME_FILES = {"openvino-bf16": "openvino-fp32"}  # the fp32 IR computed in bf16 (OpenVINO's CPU default)
NEEDS_BF16 = ("torch-bf16", "openvino-bf16")


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def one(runtime: str, folder: Path, resolution: int, steps: int) -> dict:
    """Load `runtime`'s pipeline, warm it up, time one image (run in a child process)."""
    import torch

    from personalize.pipeline import build_pipeline, generate
    from personalize.runtimes import runtime_components
    from personalize.sources import load_components

    t = time.perf_counter()
    if runtime.startswith("torch"):
        dtype = torch.bfloat16 if runtime == "torch-bf16" else torch.float32
        comps = load_components(folder, dtype=dtype)
        comps["vae"].to(dtype)
        pipe = build_pipeline(comps, "dpm++")
    else:
        name = SAME_FILES.get(runtime, runtime)
        pipe = build_pipeline(runtime_components(folder, EXPORTS[name][0], "bf16" if "bf16" in runtime else "fp32"), "dpm++")
    load_s = time.perf_counter() - t
    kw = dict(guidance_scale=7.5, resolution=resolution)
    generate(pipe, ["a photo of a dog"], [0], steps=2, **kw)  # warm-up
    t = time.perf_counter()
    generate(pipe, ["a photo of a dog on the beach"], [1], steps=steps, **kw)
    return {"runtime": runtime, "resolution": resolution, "steps": steps, "s_per_image": time.perf_counter() - t,
            "load_s": load_s, "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss carries the parent's
    peak into a child on Linux: the exports' would show in every row)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolutions", default="256")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--cache", default=str(ROOT / "benchmarks/results/cache"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/deploy_speed.json"))
    p.add_argument("--one", nargs=4, metavar=("RUNTIME", "FOLDER", "RES", "STEPS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], Path(a.one[1]), int(a.one[2]), int(a.one[3]))))
        return 0

    from benchmarks.train_speed import bench_pipeline, cpu_name
    from personalize.export.deploy import export_deploy
    from personalize.precision import cpu_bf16_is_native

    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    base = bench_pipeline("bk-sdm-small", cache)
    load = {"before": os.getloadavg()}
    folders, sizes, export_s = {}, {"torch-fp32": _dir_bytes(base)}, {}
    runtimes = [r for r in a.runtimes.split(",") if r not in NEEDS_BF16 or cpu_bf16_is_native()]
    for r in [SAME_FILES.get(r, r) for r in runtimes]:
        if r in EXPORTS:
            fmt, wf = EXPORTS[r]
            folders[r] = cache / f"bk-sdm-small-{r}"
            if not (folders[r] / "export.json").is_file():
                t = time.perf_counter()
                export_deploy(base, folders[r], fmt, weight_format=wf)
                export_s[r] = time.perf_counter() - t
            sizes[r] = _dir_bytes(folders[r])
        else:
            folders[r] = base
    folders.update({r: folders[SAME_FILES[r]] for r in runtimes if r in SAME_FILES})
    sizes.update({r: sizes[SAME_FILES[r]] for r in runtimes if r in SAME_FILES})
    sizes["torch-bf16"] = sizes["torch-fp32"]
    rows = []
    for res in map(int, a.resolutions.split(",")):
        for r in runtimes:
            out = subprocess.run([sys.executable, __file__, "--one", r, str(folders[r]), str(res), str(a.steps)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["bytes"], row["export_s"] = sizes.get(r), export_s.get(r)
            rows.append(row)
            print(f"{r} {res}px: {row['s_per_image']:.1f} s/image", flush=True)
    load["after"] = os.getloadavg()

    from rich.console import Console
    from rich.table import Table

    verdicts = {}
    table = Table(title=f"bk-sdm-small shape, {a.steps} steps, batch 1, on {cpu_name()} "
                        f"(load {load['before'][0]:.1f} -> {load['after'][0]:.1f})")
    for col in ("runtime", "px", "s/image", "vs best torch", "files MiB", "peak RSS MiB"):
        table.add_column(col)
    for res in sorted({r["resolution"] for r in rows}):
        at = [r for r in rows if r["resolution"] == res]
        best_torch = min(r["s_per_image"] for r in at if r["runtime"].startswith("torch"))
        for r in at:
            r["vs_best_torch"] = r["s_per_image"] / best_torch
            table.add_row(r["runtime"], str(res), f"{r['s_per_image']:.1f}", f"{r['vs_best_torch']:.2f}x",
                          f"{(r['bytes'] or 0) / 2**20:.0f}", f"{r['peak_rss_mib']:.0f}")
        ov = [r["vs_best_torch"] for r in at if r["runtime"].startswith("openvino")]
        verdicts[res] = {"best_openvino_vs_torch": min(ov) if ov else None,
                         "target_0.5x_met": bool(ov) and min(ov) <= 0.5}
    Console().print(table)
    print("target (OpenVINO <= 0.5x best torch):", {k: v["target_0.5x_met"] for k, v in verdicts.items()})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    out.write_text(json.dumps({"device": cpu_name(), "native_bf16": cpu_bf16_is_native(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "loadavg": load,
                               "rows": rows, "verdicts": verdicts, "date": time.strftime("%Y-%m-%d %H:%M")},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
