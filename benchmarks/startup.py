"""Start-up time of the CLI: how long `personalize --help`, the light commands and an argument
error take, wall clock, in fresh processes (nothing cached in memory between runs).

    python benchmarks/startup.py                       # this checkout
    python benchmarks/startup.py --src /path/to/other  # another checkout, same venv (before/after)

Prints a table and writes benchmarks/results/startup.json (median and min of --repeats runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "--help": ["--help"],
    "lora --help": ["lora", "--help"],
    "subjects": ["subjects"],
    "backbones": ["backbones"],
    "bad flag": ["lora", "--subject", "dog", "--steps", "x"],
    "env": ["env"],
}


def time_case(argv: list[str], src: Path, repeats: int) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "personalize", *argv], env=env, cwd=src,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                    help="checkout whose personalize to time (default: this one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "startup.json")
    args = ap.parse_args()
    rows = []
    for name, argv in CASES.items():
        ts = time_case(argv, args.src.resolve(), args.repeats)
        rows.append({"command": name, "median_s": round(statistics.median(ts), 3), "min_s": round(min(ts), 3)})
    print(f"{'command':<14} {'median s':>9} {'min s':>7}")
    for r in rows:
        print(f"{r['command']:<14} {r['median_s']:>9.3f} {r['min_s']:>7.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"src": str(args.src), "machine": platform.processor() or platform.machine(),
                                    "cpus": os.cpu_count(), "python": platform.python_version(),
                                    "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
