"""`personalize batch`: failure isolation, idempotent reruns, kill + rerun == uninterrupted, shards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_DATASET, write_photos

SUBJECTS = ["dog", "cat2", "backpack"]
BATCH_FAST = ["--base", "tiny", "--steps", "3", "--class-images", "2", "--class-image-steps", "2",
              "--validation-images", "0", "--log-every", "1", "--resolution", "32", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def three_subjects(tmp_path_factory):
    """Three subjects (real photos from ../shared when present), the third with a corrupt photo."""
    root = tmp_path_factory.mktemp("batchdata")
    for i, name in enumerate(SUBJECTS):
        if SHARED_DATASET.is_dir():
            shutil.copytree(SHARED_DATASET / name, root / name)
        else:
            write_photos(root / name, n=3, seed=40 + i)
    (root / "backpack" / "99.jpg").write_bytes(b"not an image at all")
    return root


def _adapters(batch_dir, subjects):
    return {s: load_file(batch_dir / "tiny" / "lora" / s / "pytorch_lora_weights.safetensors") for s in subjects}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished_batch(three_subjects, tmp_path_factory):
    from personalize.cli import main

    out = tmp_path_factory.mktemp("batch") / "b"
    code = main(["batch", "--method", "lora", "--subjects", ",".join(SUBJECTS), "--data-dir", str(three_subjects),
                 "--batch-dir", str(out), *BATCH_FAST])
    return out, code


def test_failed_subject_is_recorded_and_the_rest_finish(finished_batch):
    out, code = finished_batch
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {r["subject"]: r for r in summary["jobs"]}
    assert status["dog"]["status"] == "finished" and status["cat2"]["status"] == "finished"
    assert status["backpack"]["status"] == "failed" and "99.jpg" in status["backpack"]["error"]
    assert summary["counts"] == {"finished": 2, "failed": 1, "pending": 0}
    assert "backpack | failed" in (out / "summary.md").read_text()
    for s in ("dog", "cat2"):
        assert (out / "tiny" / "lora" / s / "pytorch_lora_weights.safetensors").is_file()
        assert isinstance(status[s]["final_loss"], float)
    assert not (out / "tiny" / "lora" / "backpack").exists()


def test_rerun_trains_nothing_new(finished_batch, three_subjects, cli, monkeypatch):
    out, _ = finished_batch
    import personalize.dreambooth as db

    trained = []
    real = db.train
    monkeypatch.setattr(db, "train", lambda cfg, **k: trained.append(cfg.subject) or real(cfg, **k))
    stamps = {s: (out / "tiny" / "lora" / s / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
              for s in ("dog", "cat2")}
    r = cli("batch", "--method", "lora", "--subjects", ",".join(SUBJECTS), "--data-dir", three_subjects,
            "--batch-dir", out, *BATCH_FAST)
    assert r.code == 1  # the corrupt subject still fails, and fails again before any training
    assert trained == ["backpack"]
    assert not (out / "tiny" / "lora" / "backpack").exists()
    for s, t in stamps.items():
        assert (out / "tiny" / "lora" / s / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == t


def test_killed_batch_rerun_equals_uninterrupted(finished_batch, three_subjects, tmp_path, cli, monkeypatch):
    out, _ = finished_batch
    import personalize.train as train_mod

    calls = {"n": 0}
    real_save = train_mod.save_checkpoint

    def die_in_second_subject(run_dir, step, *a, **k):
        real_save(run_dir, step, *a, **k)
        if "cat2" in str(run_dir) and step == 2:
            calls["n"] += 1
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", die_in_second_subject)
    args = ["batch", "--method", "lora", "--subjects", "dog,cat2", "--data-dir", three_subjects,
            "--batch-dir", tmp_path, *BATCH_FAST, "--checkpoint-every", "2"]
    assert cli(*args).code == 130 and calls["n"] == 1
    assert (tmp_path / "tiny" / "lora" / "dog" / "run.json").is_file()
    assert not (tmp_path / "tiny" / "lora" / "cat2" / "run.json").exists()
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert cli(*args).code == 0
    ours, ref = _adapters(tmp_path, ["dog", "cat2"]), _adapters(out, ["dog", "cat2"])
    for s in ("dog", "cat2"):
        assert _same(ours[s], ref[s]), s


def test_two_shards_make_the_same_runs_as_one_process(finished_batch, three_subjects, tmp_path, cli):
    out, _ = finished_batch
    args = ["batch", "--method", "lora", "--subjects", "dog,cat2", "--data-dir", three_subjects,
            "--batch-dir", tmp_path, *BATCH_FAST]
    assert cli(*args, "--shard", "0/2").code == 0
    part = json.loads((tmp_path / "summary.json").read_text())["counts"]
    assert part == {"finished": 1, "failed": 0, "pending": 1}
    assert cli(*args, "--shard", "1/2").code == 0
    merged = json.loads((tmp_path / "summary.json").read_text())["counts"]
    assert merged == {"finished": 2, "failed": 0, "pending": 0}
    ours, ref = _adapters(tmp_path, ["dog", "cat2"]), _adapters(out, ["dog", "cat2"])
    for s in ("dog", "cat2"):
        assert _same(ours[s], ref[s]), s


def test_grid_of_bases_and_methods(three_subjects, tmp_path, cli, tiny_base):
    r = cli("batch", "--methods", "lora,full", "--bases", f"tiny,{tiny_base}", "--subjects", "dog",
            "--data-dir", three_subjects, "--batch-dir", tmp_path, *BATCH_FAST[2:], "--steps", "1")
    assert r.code == 0, r.err
    runs = sorted(p.relative_to(tmp_path).parts[:2] for p in tmp_path.glob("*/*/dog/run.json"))
    assert len(runs) == 4 and {m for _, m in runs} == {"lora", "full"}


def test_subject_selection_and_shard_parsing(three_subjects):
    from personalize.batch import parse_shard, select_subjects
    from personalize.errors import UserError

    assert select_subjects("dog*,cat2", None)[:2] == ["dog", "dog2"] and "cat2" in select_subjects("dog*,cat2", None)
    assert set(select_subjects(None, str(three_subjects))) == set(SUBJECTS)
    with pytest.raises(UserError, match="did you mean"):
        select_subjects("dgo", None)
    assert parse_shard("1/3") == (1, 3)
    with pytest.raises(UserError):
        parse_shard("3/3")


def test_launcher_env_becomes_a_single_process_worker(monkeypatch):
    from personalize.train import launcher_shard

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert launcher_shard() == (2, 4)
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6" and "WORLD_SIZE" not in os.environ
