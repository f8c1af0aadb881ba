"""`personalize batch`: failure isolation, idempotent reruns, kill + rerun == uninterrupted, shards,
one base load per base, class images shared per class, --eval wiring, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_DATASET, write_photos

SUBJECTS = ["dog", "dog2", "backpack"]  # two of one class (shared class images); backpack gets a corrupt photo
EXTRA = "cat2"  # in the data dir, not in the main batch: the NaN / out-of-memory test's extra subject
# fp32 on every CPU: the grid test compares a LoRA trained after full finetuning with one trained
# alone, and under bf16 the shared class images would depend on which method generated them (a
# LoRA's frozen base is stored in bf16, a full run's is fp32 under autocast)
BATCH_FAST = ["--base", "tiny", "--steps", "3", "--class-images", "2", "--class-image-steps", "2",
              "--validation-images", "0", "--log-every", "1", "--resolution", "32", "--lr", "1e-3",
              "--mixed-precision", "no"]


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """This module's class images (32 px, 2 steps) stay out of the session cache other modules count,
    and what the class-image assertions see was made by this module alone."""
    root = tmp_path_factory.mktemp("batch-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERSONALIZE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The subjects' photos (real ones from ../shared when present, synthetic otherwise); backpack
    also holds a corrupt photo."""
    root = tmp_path_factory.mktemp("batchdata")
    for i, name in enumerate([*SUBJECTS, EXTRA]):
        if SHARED_DATASET.is_dir():
            shutil.copytree(SHARED_DATASET / name, root / name)
        else:
            write_photos(root / name, n=3, seed=40 + i)
    (root / "backpack" / "99.jpg").write_bytes(b"not an image at all")
    return root


def _adapters(batch_dir, subjects, base="tiny"):
    return {s: load_file(batch_dir / base / "lora" / s / "pytorch_lora_weights.safetensors") for s in subjects}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _summary(batch_dir):
    return json.loads((batch_dir / "summary.json").read_text())


def _rows(batch_dir):
    return {r["subject"]: r for r in _summary(batch_dir)["jobs"]}


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.fixture(scope="module")
def finished_batch(data, tmp_path_factory):
    """The reference batch: uninterrupted, one process. Returns (batch dir, exit code, output)."""
    from personalize.cli import main

    out = tmp_path_factory.mktemp("batch") / "b"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(["batch", "--method", "lora", "--subjects", ",".join(SUBJECTS), "--data-dir", str(data),
                     "--batch-dir", str(out), *BATCH_FAST])
    return out, code, printed.getvalue()


def test_failed_subject_is_recorded_and_the_rest_finish(finished_batch):
    out, code, printed = finished_batch
    assert code == 1
    summary = _summary(out)
    status = {r["subject"]: r for r in summary["jobs"]}
    assert status["dog"]["status"] == "finished" and status["dog2"]["status"] == "finished"
    assert status["backpack"]["status"] == "failed" and "99.jpg" in status["backpack"]["error"]
    assert summary["counts"] == {"finished": 2, "failed": 1, "pending": 0}
    assert "backpack | failed" in (out / "summary.md").read_text()
    for s in ("dog", "dog2"):
        assert (out / "tiny" / "lora" / s / "pytorch_lora_weights.safetensors").is_file()
        assert isinstance(status[s]["final_loss"], float) and status[s]["seconds"] > 0
    assert not (out / "tiny" / "lora" / "backpack").exists()
    # the failure is one printed line, no traceback; the overall bar ran over all three subjects
    failed = [ln for ln in printed.splitlines() if "failed:" in ln]
    assert len(failed) == 1 and "backpack" in failed[0] and "99.jpg" in failed[0]
    assert "Traceback" not in printed
    assert any(ln.lstrip().startswith("batch") and "3/3" in ln for ln in printed.splitlines())
    assert not list(out.rglob("*.tmp"))


def test_subjects_of_one_class_share_class_images(finished_batch):
    out, _, _ = finished_batch
    runs = {s: json.loads((out / "tiny" / "lora" / s / "run.json").read_text())["class_images"]
            for s in ("dog", "dog2")}
    assert runs["dog"]["dir"] == runs["dog2"]["dir"]
    assert runs["dog"]["generated_now"] == 2 and runs["dog2"]["generated_now"] == 0


def test_rerun_trains_nothing_new(finished_batch, data, cli, monkeypatch):
    out, _, _ = finished_batch
    import personalize.dreambooth as db

    trained = []
    real = db.train_subject
    monkeypatch.setattr(db, "train_subject", lambda cfg, **k: trained.append(cfg.subject) or real(cfg, **k))
    stamps = {s: (out / "tiny" / "lora" / s / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
              for s in ("dog", "dog2")}
    r = cli("batch", "--method", "lora", "--subjects", ",".join(SUBJECTS), "--data-dir", data,
            "--batch-dir", out, *BATCH_FAST)
    assert r.code == 1  # the corrupt subject still fails, and fails again before any training
    assert trained == ["backpack"]
    assert not (out / "tiny" / "lora" / "backpack").exists()
    for s, t in stamps.items():
        assert (out / "tiny" / "lora" / s / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == t
    assert _summary(out)["counts"] == {"finished": 2, "failed": 1, "pending": 0}


def test_rerun_with_other_training_flags_is_refused(finished_batch, data, cli):
    out, _, _ = finished_batch
    before = (out / "summary.json").stat().st_mtime_ns
    r = cli("batch", "--subjects", ",".join(SUBJECTS), "--data-dir", data, "--batch-dir", out, *BATCH_FAST,
            "--steps", "5")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "--steps" in r.err
    assert (out / "summary.json").stat().st_mtime_ns == before


def test_killed_batch_rerun_equals_uninterrupted(finished_batch, data, tmp_path, cli, monkeypatch):
    """Killed mid-training, then killed again while the final outputs were being written: the
    third run completes, with the same adapters as the uninterrupted batch."""
    out, _, _ = finished_batch
    import personalize.card as card
    import personalize.checkpoints as train_mod

    real_save, real_card = train_mod.save_checkpoint, card.model_card

    def die_in_second_subject(run_dir, step, *a, **k):
        real_save(run_dir, step, *a, **k)
        if "dog2" in str(run_dir) and step == 2:
            raise KeyboardInterrupt

    def die_writing_outputs(p, *a, **k):
        if p.subject.name == "dog2":
            raise KeyboardInterrupt
        return real_card(p, *a, **k)

    args = ["batch", "--method", "lora", "--subjects", "dog,dog2", "--data-dir", data,
            "--batch-dir", tmp_path, *BATCH_FAST, "--checkpoint-every", "2"]
    monkeypatch.setattr(train_mod, "save_checkpoint", die_in_second_subject)
    assert cli(*args).code == 130
    assert (tmp_path / "tiny" / "lora" / "dog" / "run.json").is_file()
    assert not (tmp_path / "tiny" / "lora" / "dog2" / "run.json").exists()
    assert _summary(tmp_path)["counts"] == {"finished": 1, "failed": 0, "pending": 1}
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    monkeypatch.setattr(card, "model_card", die_writing_outputs)
    r = cli(*args)
    assert r.code == 130 and "step 2/3" in r.out  # resumed, not restarted
    assert (tmp_path / "tiny" / "lora" / "dog2" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "tiny" / "lora" / "dog2" / "run.json").exists()
    monkeypatch.setattr(card, "model_card", real_card)
    r = cli(*args)
    assert r.code == 0 and "step 3/3" in r.out
    ours, ref = _adapters(tmp_path, ["dog", "dog2"]), _adapters(out, ["dog", "dog2"])
    for s in ("dog", "dog2"):
        assert _same(ours[s], ref[s]), s


def test_nan_and_out_of_memory_are_recorded_and_the_batch_goes_on(finished_batch, data, tmp_path, cli, monkeypatch):
    """cat2's loss turns NaN, dog runs out of memory mid-training; dog2, trained next on the same
    in-memory base, still matches the uninterrupted batch. Each failure is one line."""
    out, _, _ = finished_batch
    import personalize.dreambooth as db

    real_fit = db.fit

    def flaky_fit(accelerator, models, loss_fn, cfg, run_dir, **kw):
        subject = run_dir.name

        def loss(ms, step, micro, g):
            parts = loss_fn(ms, step, micro, g)
            if subject == "dog" and step == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return {k: v * float("nan") for k, v in parts.items()} if subject == EXTRA else parts

        return real_fit(accelerator, models, loss, cfg, run_dir, **kw)

    monkeypatch.setattr(db, "fit", flaky_fit)
    r = cli("batch", "--subjects", f"{EXTRA},dog,dog2", "--data-dir", data, "--batch-dir", tmp_path, *BATCH_FAST)
    assert r.code == 1
    rows = _rows(tmp_path)
    assert rows[EXTRA]["status"] == "failed" and "nan" in rows[EXTRA]["error"].lower()
    assert rows["dog"]["status"] == "failed" and "out of memory" in rows["dog"]["error"]
    assert rows["dog2"]["status"] == "finished"
    assert _same(_adapters(tmp_path, ["dog2"])["dog2"], _adapters(out, ["dog2"])["dog2"])
    failed = [ln for ln in r.out.splitlines() if "failed:" in ln]
    assert len(failed) == 2 and "Traceback" not in r.out + r.err
    # the unexpected error keeps its traceback on disk, for the user who wants it
    status = json.loads(next((tmp_path / ".status").glob("*--dog.json")).read_text())
    assert "OutOfMemoryError" in status["traceback"]


def test_error_lines_name_out_of_memory():
    from personalize.batch import describe_error
    from personalize.errors import UserError

    assert describe_error(RuntimeError("CUDA error: out of memory\nCUDA kernel errors ...")).startswith("out of memory")
    assert describe_error(MemoryError()).startswith("out of memory")
    assert describe_error(ValueError("bad\nsecond line")) == "ValueError: bad"
    assert describe_error(UserError("photo x.jpg is corrupt")) == "photo x.jpg is corrupt"


def test_two_shards_make_the_same_runs_as_one_process(finished_batch, data, tmp_path, cli, monkeypatch):
    """Shard 0 as `accelerate launch` would start it (launcher variables), shard 1 with --shard."""
    out, _, _ = finished_batch
    import personalize.dreambooth as db

    trained = []
    real = db.train_subject
    monkeypatch.setattr(db, "train_subject", lambda cfg, **k: trained.append(cfg.subject) or real(cfg, **k))
    args = ["batch", "--method", "lora", "--subjects", "dog,dog2", "--data-dir", data,
            "--batch-dir", tmp_path, *BATCH_FAST]
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(k, v)
    assert cli(*args).code == 0
    assert _summary(tmp_path)["counts"] == {"finished": 1, "failed": 0, "pending": 1}
    assert cli(*args, "--shard", "1/2").code == 0
    assert _summary(tmp_path)["counts"] == {"finished": 2, "failed": 0, "pending": 0}
    assert sorted(trained) == ["dog", "dog2"]  # each trained once, by one shard
    ours, ref = _adapters(tmp_path, ["dog", "dog2"]), _adapters(out, ["dog", "dog2"])
    for s in ("dog", "dog2"):
        assert _same(ours[s], ref[s]), s


def test_shards_partition_the_grid_and_keep_classes_together():
    from personalize.batch import plan, shard_jobs
    from personalize.subjects import load_subjects

    subjects = load_subjects()
    jobs = plan(["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"], ["lora", "full"], list(subjects))
    for world in range(1, 9):
        shards = [shard_jobs(jobs, i, world) for i in range(world)]
        flat = [j for s in shards for j in s]
        assert sorted(flat, key=jobs.index) == jobs  # every job once, none twice
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        owners: dict = {}
        for i, s in enumerate(shards):
            for j in s:
                owners.setdefault((j.base, subjects[j.subject].class_noun), set()).add(i)
        # a shard is a contiguous run of the class-ordered grid: only its ends split a class
        assert sum(len(o) > 1 for o in owners.values()) <= world - 1


def test_grid_loads_each_base_once(finished_batch, data, tmp_path, cli, tiny_base, monkeypatch):
    """2 bases x (full, lora): one load per base; the LoRA trained after full finetuning on the
    reused base equals the reference (the reset restored the pristine weights)."""
    out, _, _ = finished_batch
    import personalize.dreambooth as db

    loads = _count_calls(monkeypatch, db, "load_components")
    r = cli("batch", "--methods", "full,lora", "--bases", f"tiny,{tiny_base}", "--subjects", "dog",
            "--data-dir", data, "--batch-dir", tmp_path, *BATCH_FAST[2:])
    assert r.code == 0, r.err
    assert len(loads) == 2
    runs = sorted(p.relative_to(tmp_path).parts[:2] for p in tmp_path.glob("*/*/dog/run.json"))
    assert len(runs) == 4 and {m for _, m in runs} == {"lora", "full"}
    ref = _adapters(out, ["dog"])["dog"]
    for base_dir in {b for b, _ in runs}:
        assert _same(_adapters(tmp_path, ["dog"], base=base_dir)["dog"], ref), base_dir


def test_a_base_that_cannot_load_fails_its_jobs_after_one_try(data, tmp_path, monkeypatch):
    import personalize.sources as sources
    from personalize.batch import run_batch
    from personalize.config import TrainConfig

    not_a_base = tmp_path / "not-a-pipeline"
    not_a_base.mkdir()
    tries = _count_calls(monkeypatch, sources, "resolve_base")
    template = TrainConfig(method="lora", subject="batch", data_dir=str(data))
    summary = run_batch(template, [str(not_a_base)], ["lora"], ["dog", "dog2"], tmp_path / "b", log=lambda s: None)
    assert len(tries) == 1
    assert [r["status"] for r in summary["jobs"]] == ["failed", "failed"]
    assert all("not a diffusers pipeline" in r["error"] for r in summary["jobs"])


def test_eval_scores_each_finished_subject_once(finished_batch, data, tmp_path, cli, monkeypatch):
    """--eval on a finished batch: scores what is unscored (no training), records a scoring failure
    (exit 1) and retries only that one on the next run; the scores reach summary and table."""
    out, _, _ = finished_batch
    import personalize.batch as batch
    import personalize.dreambooth as db

    work = tmp_path / "b"
    shutil.copytree(out, work)
    monkeypatch.setattr(db, "train_subject", lambda *a, **k: pytest.fail("a finished subject was trained again"))
    evaluated, loads, broken = [], [], {"dog2"}

    def evaluate(run_dir):
        evaluated.append(run_dir.name)
        if run_dir.name in broken:
            raise RuntimeError("evaluator exploded")
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "eval" / "scores.json").write_text(json.dumps({"scores": _fake_scores(run_dir.name)}))

    monkeypatch.setattr(batch, "evaluator", lambda *a: lambda: loads.append(a) or evaluate)
    args = ["batch", "--subjects", "dog,dog2", "--data-dir", data, "--batch-dir", work, *BATCH_FAST, "--eval"]
    r = cli(*args)
    assert r.code == 1 and len(loads) == 1 and sorted(evaluated) == ["dog", "dog2"]
    rows = _rows(work)
    assert rows["dog"]["scores"] == _fake_scores("dog") and "evaluator exploded" in rows["dog2"]["eval_error"]
    assert "DINO" in r.out and f"{_fake_scores('dog')['dino']:.3f}" in r.out
    assert f"{_fake_scores('dog')['clip_t']:.3f}" in (work / "summary.md").read_text()

    broken.clear()
    evaluated.clear()
    assert cli(*args).code == 0 and evaluated == ["dog2"]
    assert _rows(work)["dog2"]["scores"] == _fake_scores("dog2") and "eval_error" not in _rows(work)["dog2"]
    evaluated.clear()
    assert cli(*args).code == 0 and evaluated == [] and len(loads) == 2  # all scored: evaluators not even loaded


def _fake_scores(name: str) -> dict:
    return {"dino": len(name) / 10, "clip_i": len(name) / 20, "clip_t": len(name) / 40}


@pytest.mark.parametrize("extra, culprit", [
    (["--subjects", "dgo"], "dgo"),  # unknown name, with a suggestion
    (["--subjects", "dog*,teapot"], "teapot"),  # known, but no photos in the data dir
    (["--subjects", "zz*"], "zz*"),
    (["--subjects", "dog", "--shard", "2/2"], "2/2"),
    (["--subjects", "dog", "--shard", "one/two"], "one/two"),
    (["--subjects", "dog", "--methods", "lora,dreambooth"], "dreambooth"),
    (["--subjects", "dog", "--bases", "tiny,bk-sdm-huge"], "bk-sdm-huge"),
    (["--subjects", "dog", "--steps", "0"], "--steps"),
])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, cli, extra, culprit):
    r = cli("batch", "--data-dir", data, "--batch-dir", tmp_path / "b", *BATCH_FAST, *extra)
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1 and culprit in r.err
    assert not (tmp_path / "b").exists()


def test_subject_selection(data, tmp_path, monkeypatch):
    from personalize.batch import select_subjects
    from personalize.errors import UserError

    assert select_subjects("dog*,cat2", str(data)) == ["dog", "dog2", "cat2"]
    assert select_subjects("all", str(data)) == select_subjects(None, str(data))
    assert set(select_subjects(None, str(data))) == {*SUBJECTS, EXTRA}
    monkeypatch.chdir(tmp_path)  # no dataset in the default place, and offline: one line saying where to put it
    with pytest.raises(UserError, match="offline"):
        select_subjects(None, None)


def test_launcher_env_becomes_a_single_process_worker(monkeypatch):
    from personalize.batch import launcher_shard

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert launcher_shard() == (2, 4)
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6" and "WORLD_SIZE" not in os.environ


def test_a_relative_base_path_never_makes_a_hidden_run_folder(data, tiny_base, tmp_path, monkeypatch, cli):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_base, tmp_path / "x")
    monkeypatch.chdir(work)
    r = cli("batch", "--bases", "../x", "--subjects", "dog", "--data-dir", data, "--batch-dir", tmp_path / "b",
            *BATCH_FAST[2:], "--steps", "1")
    assert r.code == 0, r.err
    (run,) = [p.parent for p in (tmp_path / "b").rglob("run.json")]
    assert not any(part.startswith(".") for part in run.relative_to(tmp_path / "b").parts), run
    from personalize.runs import find_run_dirs

    assert find_run_dirs(tmp_path / "b") == [run]  # eval and report find it (hidden folders are skipped)


@pytest.mark.parametrize("argv,fragment", [
    (["--subjects", ""], "--subjects is empty"),
    (["--subjects", " , "], "--subjects is empty"),
    (["--bases", "tiny,bk-sdm-huge"], "unknown base 'bk-sdm-huge'"),
    (["--methods", "lora,dreamfusion"], "unknown method 'dreamfusion'"),
    (["--subjects", "dog", "--lr", "nan"], "--lr must be a finite number"),
])
def test_every_part_of_a_batch_is_checked_before_any_starts(argv, fragment, data, tmp_path, cli):
    base = [] if "--bases" in argv else ["--base", "tiny"]
    r = cli("batch", *base, "--data-dir", data, "--batch-dir", tmp_path / "b", *BATCH_FAST[2:], *argv)
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and fragment in lines[0], r.err
    assert not (tmp_path / "b").exists()
