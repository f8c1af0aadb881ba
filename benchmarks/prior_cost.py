"""What prior preservation costs a whole run: DreamBooth's generated class images against the frozen
base's own prediction (`--prior base-prediction`), from the first command to the finished run.

    python benchmarks/prior_cost.py                                   # bk-sdm-small shape, 256 px
    python benchmarks/prior_cost.py --resolutions 256,512 --steps 40 --class-images 10

Each run is `personalize lora` itself in a fresh process with an empty class-image cache (random
weights of the real shape, as train_speed.py builds them; the cost of a step does not depend on the
weights), timed wall clock. A run at the recipe's size (800 steps, 200 class images) takes hours on
a CPU, so the runs here are smaller; each run's run.json gives its parts (load, class images, cache,
steps), and the table's last columns put the measured parts together at the recipe's size:
load + cache + 200 x (s per class image) + 800 x (s/step), marked as computed, not measured.

Prints a table and writes JSON (default benchmarks/results/prior_cost.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import ROOT, bench_pipeline, cpu_name, write_results, synthetic_photos  # noqa: E402

RECIPE_STEPS, RECIPE_CLASS_IMAGES = 800, 200  # BK-SDM's DreamBooth recipe


def one_run(base: Path, work: Path, resolution: int, prior: str, a) -> dict:
    photos = synthetic_photos(work / f"photos{resolution}", 4, resolution)
    out = work / f"run-{prior}-{resolution}"
    cmd = [sys.executable, "-m", "personalize", "lora", "--subject", str(photos), "--class-noun", "dog",
           "--base", str(base), "--steps", str(a.steps), "--resolution", str(resolution), "--prior", prior,
           "--class-images", str(a.class_images), "--class-image-steps", str(a.class_image_steps),
           "--validation-images", "0", "--checkpoint-every", "0", "--output-dir", str(out)]
    env = {**os.environ, "PERSONALIZE_CACHE": str(work / f"cache-{prior}-{resolution}"), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    meta = json.loads((out / "run.json").read_text())
    st, ci = meta["stats"], meta.get("class_images") or {}
    per_image = ci["seconds"] / ci["generated_now"] if ci.get("generated_now") else 0.0
    return {"wall_s": wall, "load_s": st.get("load_seconds"), "cache_s": st.get("cache_seconds"),
            "class_images_s": ci.get("seconds", 0.0), "s_per_class_image": per_image, "s_per_step": st["seconds_per_step"],
            "precision": st.get("mixed_precision"), "stats": st}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bk-sdm-small")
    p.add_argument("--resolutions", default="256")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--class-images", type=int, default=10, help="class images of the class-images runs")
    p.add_argument("--class-image-steps", type=int, default=25, help="their denoising steps (the CLI's default)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache/personalize/bench"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/prior_cost.json"))
    a = p.parse_args()

    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    base = bench_pipeline(a.model, cache)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for res in map(int, a.resolutions.split(",")):
            for prior in ("class-images", "base-prediction"):
                print(f"[{a.model} {res}px] {prior} ...", file=sys.stderr)
                r = one_run(base, Path(work), res, prior, a)
                if "error" not in r:
                    images = RECIPE_CLASS_IMAGES if prior == "class-images" else 0
                    r["recipe_s_computed"] = (r["load_s"] + r["cache_s"] + images * r["s_per_class_image"]
                                              + RECIPE_STEPS * r["s_per_step"])
                rows.append({"resolution": res, "prior": prior, **r})
    doc = {"device": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "model": a.model,
           "settings": {"steps": a.steps, "class_images": a.class_images, "class_image_steps": a.class_image_steps},
           "rows": rows}
    print_table(doc)
    write_results(a.out, doc)
    return 0


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = doc["settings"]
    t = Table(title=f"{doc['model']}, {doc['device']}: whole runs of {s['steps']} steps "
                    f"({s['class_images']} class images of {s['class_image_steps']} steps where drawn)")
    for c in ("px", "prior", "precision", "wall s (measured)", "load s", "class img s", "s/class img", "cache s",
              "s/step", f"{RECIPE_STEPS} steps + prior, computed"):
        t.add_column(c)
    for r in doc["rows"]:
        if "error" in r:
            t.add_row(str(r["resolution"]), r["prior"], "error: " + r["error"][:80], *[""] * 7)
            continue
        t.add_row(str(r["resolution"]), r["prior"], str(r["precision"]), f"{r['wall_s']:.0f}", f"{r['load_s']:.1f}",
                  f"{r['class_images_s']:.0f}", f"{r['s_per_class_image']:.1f}", f"{r['cache_s']:.1f}",
                  f"{r['s_per_step']:.2f}", f"{r['recipe_s_computed'] / 60:.0f} min")
    Console(width=180).print(t)


if __name__ == "__main__":
    sys.exit(main())
