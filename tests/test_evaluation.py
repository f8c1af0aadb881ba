"""The DreamBooth §4.1 protocol end to end on fake runs: synthetic real photos, 25 prompts x 2
synthetic generated PNGs, tiny in-code evaluators; then `build_report` over two runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from PIL import Image
import torch
from _metric_fixtures import (  # noqa: F401 - pytest fixtures
    _one_torch_thread,
    embedders,
    random_image,
    tiny_model_dirs,
    write_images,
)

from personalize.errors import UserError
from personalize.evaluation.metrics import mean_pairwise_cosine, mean_real_vs_real, strip_identifier
from personalize.evaluation.protocol import EVAL_DIR, GeneratedImage, evaluate_run, protocol_prompts, score_subject
from personalize.evaluation.report import build_report

IMAGES_PER_PROMPT = 2


def make_run(root: Path, *, method: str, base: str, subject: str = "dog", class_noun: str = "dog",
             kind: str = "live", token: str = "sks", image_dir: Path | None = None) -> Path:
    run_dir = root / method / base / subject
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({
        "status": "finished", "method": method, "token": token,
        "base": {"name": base, "path": "/nowhere", "hub_id": None, "source": "built-in"},
        "subject": {"name": subject, "class_noun": class_noun, "kind": kind,
                    "image_dir": str(image_dir) if image_dir else None},
    }))
    return run_dir


class FakeGenerator:
    """Stands in for personalize.generate.generate_protocol_images: writes the subject's 25 prompts
    x images_per_prompt PNGs and returns their records; remembers how it was called."""

    def __init__(self, seed_offset: int = 0):
        self.calls: list[tuple[Path, Path, dict]] = []
        self.seed_offset = seed_offset

    def __call__(self, run_dir: Path, out_dir: Path, **kwargs) -> list[dict]:
        self.calls.append((Path(run_dir), Path(out_dir), kwargs))
        run = json.loads((Path(run_dir) / "run.json").read_text())
        s = run["subject"]
        prompts = protocol_prompts(s["kind"], run["token"], s["class_noun"])
        out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for pi, prompt in enumerate(prompts):
            for k in range(kwargs["images_per_prompt"]):
                seed = self.seed_offset + 1000 + pi * 10 + k
                path = out_dir / f"p{pi:02d}_{k}.png"
                random_image(seed, (36, 36)).save(path)
                records.append({"path": str(path), "prompt": prompt, "prompt_index": pi, "seed": seed})
        return records


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    root = tmp_path / "dataset"
    write_images(root / "dog", [201, 202, 203])
    write_images(root / "backpack", [301, 302])
    return root


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ score_subject
def test_generated_identical_to_single_real_scores_one(embedders, tmp_path):
    dino, clip = embedders
    real = write_images(tmp_path / "real", [5])
    gen = [GeneratedImage(real[0], "a sks dog", 0, "dog")]
    s = score_subject(real, gen, dino=dino, clip=clip, token="sks")
    assert s.summary["dino"] == pytest.approx(1.0, abs=1e-6)
    assert s.summary["clip_i"] == pytest.approx(1.0, abs=1e-6)
    # one real photo: no other photo to compare with -> undefined, never a fake 1.0
    assert s.real_reference["n_real"] == 1 and math.isnan(s.real_reference["dino"])


def test_clip_t_uses_prompt_without_identifier(embedders, tmp_path, monkeypatch):
    dino, clip = embedders
    real = write_images(tmp_path / "real", [1, 2])
    gen_paths = write_images(tmp_path / "gen", [7, 8])
    gen = [GeneratedImage(gen_paths[0], "a sks dog in the snow", 0, "dog"),
           GeneratedImage(gen_paths[1], "a sks dog on the beach", 1, "dog")]
    seen: list[str] = []
    original = type(clip).embed_texts

    def spy(self, texts):
        seen.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(type(clip), "embed_texts", spy)
    s = score_subject(real, gen, dino=dino, clip=clip, token="sks")
    assert sorted(seen) == ["a dog in the snow", "a dog on the beach"]
    monkeypatch.undo()

    img = clip.embed_images(gen_paths)
    stripped = clip.embed_texts(["a dog in the snow", "a dog on the beach"])
    with_token = clip.embed_texts(["a sks dog in the snow", "a sks dog on the beach"])
    cos = torch.nn.functional.cosine_similarity
    expected = cos(img, stripped, dim=1).tolist()
    assert [r["clip_t"] for r in s.images] == pytest.approx(expected, abs=1e-5)
    assert [r["clip_t"] for r in s.images] != pytest.approx(cos(img, with_token, dim=1).tolist(), abs=1e-5)
    assert [r["clip_prompt"] for r in s.images] == ["a dog in the snow", "a dog on the beach"]


def test_subject_scores_equal_pairwise_means_and_real_reference(embedders, tmp_path):
    dino, clip = embedders
    real = write_images(tmp_path / "real", [11, 12, 13])
    gen_paths = write_images(tmp_path / "gen", list(range(20, 26)))
    gen = [GeneratedImage(p, f"a sks dog {i % 3}", i % 3, "dog") for i, p in enumerate(gen_paths)]
    s = score_subject(real, gen, dino=dino, clip=clip, token="sks")
    d_real, c_real = dino.embed_images(real), clip.embed_images(real)
    assert s.summary["dino"] == pytest.approx(mean_pairwise_cosine(dino.embed_images(gen_paths), d_real), abs=1e-6)
    assert s.summary["clip_i"] == pytest.approx(mean_pairwise_cosine(clip.embed_images(gen_paths), c_real), abs=1e-6)
    assert s.real_reference["dino"] == pytest.approx(mean_real_vs_real(d_real), abs=1e-9)
    assert s.real_reference["clip_i"] == pytest.approx(mean_real_vs_real(c_real), abs=1e-9)
    assert [p["n_images"] for p in s.prompts] == [2, 2, 2]
    # scores do not depend on the order the images come in
    s2 = score_subject(real[::-1], gen[::-1], dino=dino, clip=clip, token="sks")
    for m in ("dino", "clip_i", "clip_t"):
        assert s2.summary[m] == pytest.approx(s.summary[m], abs=1e-6)


def test_missing_generated_image_is_user_error(embedders, tmp_path):
    dino, clip = embedders
    real = write_images(tmp_path / "real", [1])
    with pytest.raises(UserError, match="missing"):
        score_subject(real, [GeneratedImage(tmp_path / "nope.png", "a sks dog", 0, "dog")], dino=dino, clip=clip,
                      token="sks")


# ------------------------------------------------------------------ one run end to end
def test_evaluate_run_writes_exact_files(embedders, tmp_path, dataset_dir):
    dino, clip = embedders
    run_dir = make_run(tmp_path / "runs", method="lora", base="tiny")
    gen = FakeGenerator()
    written = evaluate_run(run_dir, dino=dino, clip=clip, data_dir=str(dataset_dir),
                           images_per_prompt=IMAGES_PER_PROMPT, seed=42, generate=gen)
    out = run_dir / EVAL_DIR
    assert {p.name for p in out.iterdir() if p.is_file()} == {
        "scores_images.csv", "scores_prompts.csv", "scores.json", "scores.md"}  # and no temp files left
    assert set(written) == {"images_csv", "prompts_csv", "json", "markdown"}
    (_, images_dir, kwargs), = gen.calls
    assert images_dir == out / "images" and kwargs == {"images_per_prompt": IMAGES_PER_PROMPT, "seed": 42}

    prompts = read_csv(out / "scores_prompts.csv")
    assert len(prompts) == 25 and [int(r["prompt_index"]) for r in prompts] == list(range(25))
    assert all(int(r["n_images"]) == IMAGES_PER_PROMPT for r in prompts)
    assert all("sks" in r["prompt"] and "sks" not in r["clip_prompt"] for r in prompts)
    images = read_csv(out / "scores_images.csv")
    assert len(images) == 25 * IMAGES_PER_PROMPT
    assert all((out / r["path"]).is_file() for r in images)  # paths relative to the eval dir

    doc = json.loads((out / "scores.json").read_text())
    assert doc["subject"] == {"name": "dog", "class_noun": "dog", "kind": "live"}
    assert doc["run"] == {"method": "lora", "base": "tiny"}
    assert doc["settings"]["token"] == "sks" and doc["settings"]["n_real"] == 3
    assert doc["evaluators"]["dino"]["name"] == str(dino.name)
    assert doc["scores"]["n_images"] == 50 and doc["scores"]["n_prompts"] == 25
    assert doc["scores"]["dino"] == pytest.approx(sum(float(r["dino"]) for r in images) / 50, abs=1e-5)
    gen_paths = [out / r["path"] for r in images]
    real = sorted((dataset_dir / "dog").iterdir())
    assert doc["scores"]["clip_i"] == pytest.approx(
        mean_pairwise_cosine(clip.embed_images(gen_paths), clip.embed_images(real)), abs=1e-5)
    assert 0 < doc["real_reference"]["dino"] <= 1 and len(doc["real_images"]) == 3
    md = (out / "scores.md").read_text()
    assert "real images" in md and md.count("\n| ") >= 25 + 2


def test_evaluate_run_uses_trained_on_photos_without_data_dir(embedders, tmp_path, dataset_dir, monkeypatch):
    dino, clip = embedders
    monkeypatch.delenv("PERSONALIZE_DATA", raising=False)
    run_dir = make_run(tmp_path / "runs", method="full", base="tiny", subject="backpack", class_noun="backpack",
                       kind="object", image_dir=dataset_dir / "backpack")
    evaluate_run(run_dir, dino=dino, clip=clip, images_per_prompt=1, generate=FakeGenerator())
    doc = json.loads((run_dir / EVAL_DIR / "scores.json").read_text())
    assert doc["settings"]["n_real"] == 2 and doc["scores"]["n_prompts"] == 25
    assert doc["prompts"][0]["clip_prompt"] == strip_identifier(doc["prompts"][0]["prompt"], "sks")


def test_eval_command_missing_evaluator_is_one_line(tmp_path, capsys, monkeypatch):
    from personalize.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = make_run(tmp_path / "runs", method="lora", base="tiny")
    code = main(["eval", str(run_dir), "--dino", "no-such-org/dino-missing"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no-such-org/dino-missing" in err and "--dino PATH" in err


# ------------------------------------------------------------------ report over runs
def test_build_report_over_two_runs(embedders, tmp_path, dataset_dir, capsys):
    from PIL import Image

    from personalize.cli import main

    dino, clip = embedders
    runs = tmp_path / "runs"
    for method, base, offset in [("lora", "bk-sdm-small", 0), ("full", "bk-sdm-tiny", 5000)]:
        run_dir = make_run(runs, method=method, base=base)
        evaluate_run(run_dir, dino=dino, clip=clip, data_dir=str(dataset_dir), images_per_prompt=1,
                     generate=FakeGenerator(offset))

    written, skipped = build_report(runs)
    assert {p.name for p in written.values()} == {"report.md", "report.csv", "report.png"} and skipped == []
    rows = read_csv(runs / "report.csv")
    assert [r["row"] for r in rows] == ["run", "run", "mean", "mean", "real"]
    # registry order: bk-sdm-small before bk-sdm-tiny
    assert [(r["base"], r["method"]) for r in rows if r["row"] == "mean"] == [("bk-sdm-small", "lora"),
                                                                            ("bk-sdm-tiny", "full")]
    for r in rows[:2]:
        assert r["subject"] == "dog"
        doc = json.loads((runs / r["scores"]).read_text())
        assert float(r["dino"]) == pytest.approx(doc["scores"]["dino"], abs=1e-6)
    means = {r["base"]: r for r in rows if r["row"] == "mean"}
    assert means["bk-sdm-small"]["n_subjects"] == "1"
    assert float(means["bk-sdm-small"]["clip_t"]) == pytest.approx(float(rows[0]["clip_t"]), abs=1e-6)
    assert rows[-1]["clip_t"] == "" and float(rows[-1]["dino"]) > 0  # real row: DINO/CLIP-I only
    md = (runs / "report.md").read_text()
    assert "Means per base × method" in md and "| bk-sdm-tiny | full | 1 |" in md and "real images" in md
    with Image.open(runs / "report.png") as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 300

    # the CLI command writes the same files elsewhere
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "report.png"}
    assert (out / "report.csv").read_text() == (runs / "report.csv").read_text()


@pytest.mark.parametrize("bad,why", [
    ("{not json", "unreadable"),
    ('{"scores": {"dino": "high", "n_images": 4}}', "scores.dino is str"),
    ('{"scores": {"dino": 0.5}}', "n_images"),
    ('[1, 2]', "not a JSON object"),
])
def test_report_names_each_skipped_scores_file_and_exits_1(bad, why, embedders, tmp_path, dataset_dir, cli):
    dino, clip = embedders
    runs = tmp_path / "runs"
    good = make_run(runs, method="lora", base="tiny", subject="dog")
    evaluate_run(good, dino=dino, clip=clip, data_dir=str(dataset_dir), images_per_prompt=1,
                 generate=FakeGenerator(0))
    broken = make_run(runs, method="lora", base="tiny", subject="cat")
    (broken / EVAL_DIR).mkdir(parents=True, exist_ok=True)
    (broken / EVAL_DIR / "scores.json").write_text(bad)
    r = cli("report", runs)
    assert r.code == 1
    warnings = [line for line in r.err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and "cat" in warnings[0] and why in warnings[0]
    rows = read_csv(runs / "report.csv")
    assert [row["subject"] for row in rows if row["row"] == "run"] == ["dog"]
    assert "## Skipped" in (runs / "report.md").read_text()


def test_report_without_scores_is_user_error(tmp_path):
    make_run(tmp_path / "runs", method="lora", base="tiny")
    with pytest.raises(UserError, match="personalize eval"):
        build_report(tmp_path / "runs")


# ------------------------------------------------------------------ end to end on a real tiny run
def test_eval_and_report_end_to_end_on_a_tiny_run(lora_run_object, tiny_model_dirs, tmp_path, cli):
    """`personalize eval` generates the 25 protocol prompts x N images with the run's LoRA, scores
    them, reuses them on a second call; `personalize report` gathers it."""
    import shutil

    runs = tmp_path / "runs"
    run = runs / "lora" / "tiny" / "backpack"
    shutil.copytree(lora_run_object, run)
    flags = ["--dino", tiny_model_dirs["dino"], "--clip", tiny_model_dirs["clip"], "--images-per-prompt", "2",
             "--steps", "2", "--device", "cpu"]
    r = cli("eval", run, *flags)
    assert r.code == 0, r.err
    images = sorted((run / EVAL_DIR / "images").glob("*.png"))
    assert len(images) == 50
    prompts = read_csv(run / EVAL_DIR / "scores_prompts.csv")
    assert len(prompts) == 25 and {int(p["n_images"]) for p in prompts} == {2}
    assert prompts[0]["prompt"].startswith("a zwx backpack") and "zwx" not in prompts[0]["clip_prompt"]
    doc = json.loads((run / EVAL_DIR / "scores.json").read_text())
    assert doc["scores"]["n_images"] == 50 and doc["run"] == {"method": "lora", "base": "tiny"}
    assert all(-1 <= doc["scores"][m] <= 1 for m in ("dino", "clip_i", "clip_t"))
    with Image.open(images[0]) as im:  # the generator's metadata says which adapter drew it
        assert json.loads(im.text["personalize"])["adapters"][0]["subject"] == "my_backpack"

    stamps = [p.stat().st_mtime_ns for p in images]
    assert cli("eval", run, *flags).code == 0
    assert [p.stat().st_mtime_ns for p in images] == stamps  # same settings: nothing regenerated
    assert json.loads((run / EVAL_DIR / "scores.json").read_text())["scores"] == doc["scores"]

    assert cli("report", runs).code == 0
    rows = read_csv(runs / "report.csv")
    assert [r["row"] for r in rows] == ["run", "mean", "real"] and rows[0]["subject"] == "my_backpack"
    assert {p.name for p in runs.iterdir()} >= {"report.md", "report.csv", "report.png"}


def test_eval_runtime_openvino_draws_through_an_export_of_the_run(lora_run_object, tiny_model_dirs, tmp_path, cli,
                                                                   fresh_cache):
    """`eval --runtime openvino`: the protocol images come from an OpenVINO export of the run (LoRA
    fused) kept in the personalize cache (not in the run: an output is never inside an input), made
    once, made again when the run changes; its images are kept apart from torch's and close to them."""
    pytest.importorskip("openvino")
    import shutil

    import numpy as np

    from personalize.class_images_openvino import run_export_dir

    run = tmp_path / "backpack"
    shutil.copytree(lora_run_object, run)
    flags = ["--dino", tiny_model_dirs["dino"], "--clip", tiny_model_dirs["clip"], "--images-per-prompt", "1",
             "--steps", "2", "--device", "cpu"]
    assert cli("eval", run, *flags).code == 0
    first = run / EVAL_DIR / "images" / "p00-s0.png"
    torch_pixels = np.asarray(Image.open(first).convert("RGB"), dtype=np.float32)
    r = cli("eval", run, *flags, "--runtime", "openvino")
    assert r.code == 0, r.err
    kept = run_export_dir(run, json.loads((run / "run.json").read_text())["resolution"]) / "export.json"
    assert kept.is_relative_to(fresh_cache) and not (run / EVAL_DIR / "openvino").exists()
    export = json.loads(kept.read_text())
    assert export["format"] == "openvino" and export["run"] == json.loads((run / "run.json").read_text())
    with Image.open(first) as im:  # redrawn: OpenVINO's settings are not torch's
        meta = json.loads(im.text["personalize"])
        ov_pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert meta["export"]["format"] == "openvino" and meta["export"]["inference_precision"] in ("bf16", "fp32")
    # the run's LoRA is in the export: its image is the torch one up to the compute precision
    assert np.abs(ov_pixels - torch_pixels).mean() < 3  # measured 0.8 (of 255) with bf16 compute
    doc = json.loads((run / EVAL_DIR / "scores.json").read_text())
    assert doc["settings"]["runtime"] == "openvino" and doc["scores"]["n_images"] == 25

    stamp = kept.stat().st_mtime_ns
    images = sorted((run / EVAL_DIR / "images").glob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in images]
    assert cli("eval", run, *flags, "--runtime", "openvino").code == 0
    assert kept.stat().st_mtime_ns == stamp  # kept
    assert [p.stat().st_mtime_ns for p in images] == stamps  # and its images reused
    meta = json.loads((run / "run.json").read_text())
    meta["finished_at"] = "2099-01-01T00:00:00"  # the run trained again since
    (run / "run.json").write_text(json.dumps(meta))
    assert cli("eval", run, *flags, "--runtime", "openvino").code == 0
    again = json.loads(kept.read_text())
    assert again["run"]["finished_at"] == "2099-01-01T00:00:00"


def test_eval_dtype_draws_in_it_and_records_it(lora_run_object, tiny_model_dirs, tmp_path, cli):
    import shutil

    run = tmp_path / "backpack"
    shutil.copytree(lora_run_object, run)
    r = cli("eval", run, "--dino", tiny_model_dirs["dino"], "--clip", tiny_model_dirs["clip"], "--images-per-prompt",
            "1", "--steps", "2", "--device", "cpu", "--dtype", "bf16")
    assert r.code == 0, r.err
    with Image.open(run / EVAL_DIR / "images" / "p00-s0.png") as im:
        assert json.loads(im.text["personalize"])["dtype"] == "bf16"
    assert json.loads((run / EVAL_DIR / "scores.json").read_text())["settings"]["dtype"] == "bf16"
