"""Issue 25 on `distill prune/train/eval/report` and `personalize report`: bad input or a fault is
one line `error: <what>: <why>` naming the culprit, exit 2, no traceback, nothing written; a
damaged cache is rebuilt; a second writer of one output is refused naming the holder; odd but
valid input works. Tiny everything: the in-code teacher, a TorchScript Inception of a few
kilobytes, synthetic images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_photos
from _fid_fixtures import tiny_inception_file
from _metric_fixtures import write_images
from personalize.outputs import output_lock


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Result:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def distill_cli(capsys):
    from distill.cli import main

    def run(*args) -> Result:
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)

    return run


def one_line(r: Result, *fragments: str) -> str:
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from diffusers import StableDiffusionPipeline

    from personalize.backbones import build_tiny_components

    out = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    StableDiffusionPipeline(**build_tiny_components(seed=0), requires_safety_checker=False).save_pretrained(
        out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory) -> Path:
    from distill.cli import main

    out = tmp_path_factory.mktemp("students") / "bk-tiny"
    assert main(["prune", "--teacher", str(teacher_dir), "--arch", "bk-tiny", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    root = write_photos(tmp_path_factory.mktemp("kd-data") / "pairs", n=2, size=(72, 80), seed=3)
    with (root / "metadata.jsonl").open("w") as f:
        for i, p in enumerate(sorted(root.glob("*.jpg"))):
            f.write(json.dumps({"file_name": p.name, "text": f"a photo of thing {i}"}) + "\n")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bench-assets")
    (d / "prompts.txt").write_text("a cat\na dog\na bird\n")
    return {"inception": tiny_inception_file(d / "tiny_inception.pt"), "prompts": d / "prompts.txt",
            "real": write_images(d / "real", list(range(4)))[0].parent}


def eval_args(assets, out: Path, **swap) -> list:
    """`distill eval` on tiny at 64 px, 1 step, no CLIP; `swap` replaces a flag's value
    (`real_images=None` drops the flag)."""
    flags = {"--prompts": assets["prompts"], "--inception": assets["inception"], "--real-images": assets["real"]}
    for k, v in swap.items():
        flags[f"--{k.replace('_', '-')}"] = v
    args = ["eval", "--base", "tiny", "-o", out, "--steps", "1", "--resolution", "64", "--resize", "32",
            "--allow-pickle", "--clip", "none", "--device", "cpu", "--batch-size", "4"]
    for k, v in flags.items():
        if v is not None:
            args += [k, v]
    return args


TRAIN_FAST = ["--steps", "1", "--resolution", "64", "--batch-size", "1", "--gradient-accumulation-steps", "1",
              "--log-every", "1"]


def train_args(teacher_dir, student_dir, captions, out, *extra) -> list:
    return ["train", "--teacher", teacher_dir, "--student", student_dir, "--data", captions, "-o", out,
            *TRAIN_FAST, *extra]


# ---------------------------------------------------------------------------- distill eval: too few images
@pytest.mark.parametrize("how", ["limit-1", "one-prompt", "one-real-image"])
def test_eval_of_fewer_than_two_images_is_one_line_before_generating(how, assets, tmp_path, distill_cli):
    out = tmp_path / "o"
    if how == "limit-1":
        args, culprit = eval_args(assets, out) + ["--limit", "1"], "--limit 1"
    elif how == "one-prompt":
        (tmp_path / "one.txt").write_text("a lonely cat\n")
        args, culprit = eval_args(assets, out, prompts=tmp_path / "one.txt"), "--prompts"
    else:
        one = write_images(tmp_path / "one-real", [0])[0].parent
        args, culprit = eval_args(assets, out, real_images=one), "--real-images"
    line = one_line(distill_cli(*args), culprit, "at least 2 generated and 2 real images")
    assert "1" in line
    assert not out.exists()


def test_eval_of_one_image_without_scoring_is_fine(assets, tmp_path, distill_cli):
    """FID needs two images; generating one does not."""
    out = tmp_path / "o"
    r = distill_cli(*eval_args(assets, out), "--limit", "1", "--no-score")
    assert r.code == 0, r.err
    assert [p.name for p in (out / "images" / "im32").iterdir()] == ["00000.jpg"]


# ---------------------------------------------------------------------------- concurrent writers
def fake_distill_scores(d: Path, name: str = "m", **over) -> Path:
    """A scores.json as `distill eval` writes it (the fields `distill report` reads)."""
    d.mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "base": name, "fid": 12.5, "is": 3.0, "is_std": 0.1, "clip_score": 0.25, "n_images": 4,
           "cost": {"unet_params": 10**6, "pipeline_params": 2 * 10**6, "unet_macs": 3 * 10**9}, **over}
    (d / "scores.json").write_text(json.dumps(doc))
    return d / "scores.json"


def fake_personalize_scores(d: Path, subject: str = "dog", text: str | None = None) -> Path:
    """A scores.json as `personalize eval` writes it (no run.json: the doc describes its run)."""
    d.mkdir(parents=True, exist_ok=True)
    doc = {"scores": {"dino": 0.5, "clip_i": 0.6, "clip_t": 0.3, "n_images": 4},
           "run": {"method": "lora", "base": "tiny"}, "subject": {"name": subject}}
    (d / "scores.json").write_text(text if text is not None else json.dumps(doc))
    return d / "scores.json"


@pytest.fixture
def holder():
    """Another process holding the writer's lock of a path (killed at the end, as kill -9 would)."""
    procs = []

    def hold(path: Path) -> int:
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import time
            from personalize.outputs import output_lock
            with output_lock({str(path)!r}):
                print("held", flush=True)
                time.sleep(120)
            """)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p.pid

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_prune_into_one_output_is_refused_naming_the_holder(teacher_dir, tmp_path, holder, distill_cli):
    out = tmp_path / "student"
    pid = holder(out)  # a first `distill prune -o student`, still writing
    one_line(distill_cli("prune", "--teacher", teacher_dir, "--arch", "bk-tiny", "-o", out),
             f"-o {out}", f"pid {pid}", "is writing it")
    assert not out.exists()


def test_a_second_train_into_one_run_dir_is_refused(teacher_dir, student_dir, captions, tmp_path, distill_cli):
    out = tmp_path / "run"
    with output_lock(out):
        r = distill_cli(*train_args(teacher_dir, student_dir, captions, out))
    one_line(r, f"-o {out}", "is writing it")
    assert not out.exists()


def test_a_second_eval_into_one_folder_is_refused_before_any_record(assets, tmp_path, distill_cli):
    out = tmp_path / "o"
    with output_lock(out):
        r = distill_cli(*eval_args(assets, out))
    one_line(r, f"-o {out}", "is writing it")
    assert not out.exists()


def test_a_second_distill_report_into_one_folder_is_refused(tmp_path, distill_cli):
    fake_distill_scores(tmp_path / "evals" / "a")
    out = tmp_path / "report"
    with output_lock(out):
        r = distill_cli("report", tmp_path / "evals", "-o", out)
    one_line(r, f"{out}", "is writing it")
    assert not out.exists()


def test_a_second_personalize_report_into_one_folder_is_refused(tmp_path, cli):
    fake_personalize_scores(tmp_path / "runs" / "dog" / "eval")
    out = tmp_path / "report"
    with output_lock(out):
        r = cli("report", tmp_path / "runs", "--out", out)
    one_line(r, f"{out}", "is writing it")
    assert not out.exists()


@pytest.mark.slow  # two fresh interpreters importing torch + diffusers
def test_two_real_prunes_into_one_output_one_wins_the_other_is_one_line(teacher_dir, tmp_path):
    import os

    out = tmp_path / "student"
    cmd = [sys.executable, "-m", "distill", "prune", "--teacher", str(teacher_dir), "--arch", "bk-tiny", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted(((p.wait(timeout=300), p.stderr.read()) for p in procs), key=lambda r: r[0])
    assert [code for code, _ in results] == [0, 2], results
    err = results[1][1].strip().splitlines()
    # refused while the first writes, or (if it started after) because the first has finished
    assert len(err) == 1 and ("is writing it" in err[0] or "already exists" in err[0]), err
    from diffusers import StableDiffusionPipeline

    assert StableDiffusionPipeline.from_pretrained(out).unet.mid_block is None
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temp folder, no lock file


# ---------------------------------------------------------------------------- warnings: one form
WARNING = r"^warning: skipped (\S+scores\.json): (.+)$"


def test_warn_is_one_line_on_stderr(capsys):
    from personalize.errors import warn

    warn("runs/x/scores.json", "skipped, unreadable")
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == "warning: runs/x/scores.json: skipped, unreadable\n"


def test_both_reports_print_a_skipped_scores_file_in_one_form(tmp_path, distill_cli, cli):
    import re

    evals = tmp_path / "evals"
    fake_distill_scores(evals / "good")
    (evals / "bad").mkdir(parents=True)
    (evals / "bad" / "scores.json").write_text("{ damaged")
    r = distill_cli("report", evals, "-o", tmp_path / "r1")
    assert r.code == 1 and (tmp_path / "r1" / "benchmark.md").is_file()  # written, but not all inputs made it
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and re.match(WARNING, lines[0]), r.err
    assert re.match(WARNING, lines[0])[1] == str(evals / "bad" / "scores.json")

    runs = tmp_path / "runs"
    fake_personalize_scores(runs / "dog" / "eval")
    fake_personalize_scores(runs / "cat" / "eval", text="{ damaged")
    r = cli("report", runs, "--out", tmp_path / "r2")
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and re.match(WARNING, lines[0]), r.err
    assert re.match(WARNING, lines[0])[1] == str(runs / "cat" / "eval" / "scores.json")


# ---------------------------------------------------------------------------- distill eval: damaged / wrong-kind inputs
def _stats(path: Path, mu, sigma) -> Path:
    np.savez(path, mu=mu, sigma=sigma)
    return path


@pytest.mark.parametrize("kind", ["not-npz", "no-sigma", "mu-2d", "other-extractor", "non-finite", "empty"])
def test_eval_bad_real_stats_are_one_line_before_generating(kind, assets, tmp_path, distill_cli):
    f = tmp_path / "real.npz"
    if kind == "not-npz":
        f.write_text("mu,sigma\n1,2\n")
    elif kind == "no-sigma":
        np.savez(f, mu=np.zeros(48))
    elif kind == "mu-2d":
        _stats(f, np.zeros((48, 1)), np.eye(48))
    elif kind == "other-extractor":  # pytorch-fid's 2048-d statistics, a 48-d Inception here
        _stats(f, np.zeros(2048), np.eye(2048))
    elif kind == "non-finite":
        _stats(f, np.full(48, np.nan), np.eye(48))
    else:
        _stats(f, np.zeros(0), np.zeros((0, 0)))
    out = tmp_path / "o"
    one_line(distill_cli(*eval_args(assets, out, real_images=None, real_stats=f)), f"--real-stats {f}")
    assert not out.exists()


def test_eval_real_stats_of_the_inceptions_size_work(assets, tmp_path, distill_cli):
    """Odd but valid: hand-made statistics of the right size (identity covariance)."""
    f = _stats(tmp_path / "real.npz", np.zeros(48), np.eye(48))
    r = distill_cli(*eval_args(assets, tmp_path / "o", real_images=None, real_stats=f), "--limit", "2")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "o" / "scores.json").read_text())["fid"] > 0


@pytest.mark.parametrize("kind", ["garbage", "truncated", "not-an-inception"])
def test_eval_bad_inception_is_one_line_before_generating(kind, assets, tmp_path, distill_cli):
    f = tmp_path / "inception.pt"
    if kind == "garbage":
        f.write_bytes(b"\x07" * 5000)
    elif kind == "truncated":
        data = assets["inception"].read_bytes()
        f.write_bytes(data[: len(data) // 2])
    else:  # a TorchScript file, but of a model that does not take images
        torch.jit.save(torch.jit.script(torch.nn.Linear(10, 4)), str(f))
    out = tmp_path / "o"
    one_line(distill_cli(*eval_args(assets, out, inception=f)), f"--inception {f}")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_eval_damaged_real_image_is_one_line_naming_it_before_generating(damage, assets, tmp_path, distill_cli):
    real = tmp_path / "real"
    shutil.copytree(assets["real"], real)
    victim = sorted(real.iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes({"garbage": b"\x07" * 300, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    out = tmp_path / "o"
    one_line(distill_cli(*eval_args(assets, out, real_images=real)), str(victim))
    assert not out.exists()


def test_a_damaged_real_image_statistics_cache_is_rebuilt(assets, tmp_path, monkeypatch):
    from distill.benchmark_inputs import real_images_stats
    from personalize.evaluation.inception import load_inception

    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    net = load_inception(assets["inception"], allow_pickle=True)
    mu, sigma, cached = real_images_stats(assets["real"], net, 32, 4, log=lambda *a: None)
    cached.write_bytes(cached.read_bytes()[:40])  # a disk that filled, a copy that was cut short
    mu2, sigma2, again = real_images_stats(assets["real"], net, 32, 4, log=lambda *a: None)
    assert again == cached and torch.equal(mu, mu2) and torch.equal(sigma, sigma2)
    from personalize.evaluation.fid import load_stats

    assert torch.equal(load_stats(cached)[0], mu)  # the cache is whole again


def test_eval_redraws_a_damaged_generated_image_and_scoring_names_one(assets, tmp_path, distill_cli):
    out = tmp_path / "o"
    assert distill_cli(*eval_args(assets, out), "--limit", "2", "--no-score").code == 0
    small = out / "images" / "im32" / "00001.jpg"
    good = small.read_bytes()
    small.write_bytes(b"\x07" * 100)  # damaged after it was written: not trusted as done
    assert distill_cli(*eval_args(assets, out), "--limit", "2", "--no-score").code == 0
    assert small.read_bytes() == good  # drawn again, the same image (its own seed)
    small.write_bytes(good[: len(good) // 2])  # truncated: only a full decode sees it
    one_line(distill_cli(*eval_args(assets, out), "--limit", "2", "--no-generate"), str(small))
    assert not (out / "scores.json").exists()


@pytest.mark.parametrize("record", ["[1, 2]", '{"generation": [1]}', "{ damaged"])
def test_eval_wrong_kind_generation_record_is_one_line(record, assets, tmp_path, distill_cli):
    out = tmp_path / "o"
    out.mkdir()
    (out / "generation.json").write_text(record)
    one_line(distill_cli(*eval_args(assets, out)), str(out / "generation.json"))
    assert [p.name for p in out.iterdir()] == ["generation.json"] and (out / "generation.json").read_text() == record


@pytest.mark.parametrize("kind", ["not-utf8", "empty", "huge", "a-folder"])
def test_eval_bad_prompts_file_is_one_line(kind, assets, tmp_path, distill_cli):
    f = tmp_path / "prompts.txt"
    if kind == "not-utf8":
        f.write_bytes("a caf\u00e9\n".encode("latin-1"))
    elif kind == "empty":
        f.write_text("\n\n")
    elif kind == "huge":
        with f.open("wb") as fh:
            fh.truncate(65 << 20)  # sparse: 65 MiB of nothing
    else:
        f.mkdir()
    out = tmp_path / "o"
    one_line(distill_cli(*eval_args(assets, out, prompts=f)), f"--prompts {f}")
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--limit", "-1"), ("--steps", "0"), ("--resolution", "7"),
                                         ("--resize", "0"), ("--batch-size", "0"), ("--score-batch-size", "0"),
                                         ("--is-splits", "0"), ("--guidance-scale", "nan"),
                                         ("--guidance-scale", "-1")])
def test_eval_out_of_range_numbers_are_one_line(flag, value, assets, tmp_path, distill_cli):
    out = tmp_path / "o"
    one_line(distill_cli(*eval_args(assets, out), flag, value), flag)
    assert not out.exists()


# ---------------------------------------------------------------------------- distill train
def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def kd_run(teacher_dir, student_dir, captions, tmp_path_factory) -> Path:
    """A finished two-step KD run."""
    from distill.cli import main

    out = tmp_path_factory.mktemp("kd") / "run"
    assert main([str(a) for a in train_args(teacher_dir, student_dir, captions, out, "--steps", "2")]) == 0
    return out


def test_train_data_folder_with_a_damaged_image_is_one_line_naming_it(teacher_dir, student_dir, captions, tmp_path,
                                                                      distill_cli):
    """Files of a folder are decoded up front (a table's image bytes are skipped when met instead:
    tests/test_distill_data.py)."""
    data = tmp_path / "pairs"
    shutil.copytree(captions, data)
    (data / "zz.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with (data / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "zz.jpg", "text": "a damaged photo"}) + "\n")
    one_line(distill_cli(*train_args(teacher_dir, student_dir, data, tmp_path / "run")), "zz.jpg", "--data")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lambda-sd", "nan"), ("--lambda-kd-out", "inf"),
    ("--lambda-kd-feat", "-1"), ("--seed", "-5"), ("--seed", str(2**64)), ("--ema-decay", "2"), ("--ema-decay", "nan"),
    ("--batch-size", "0"), ("--resolution", "7"), ("--steps", "0"), ("--checkpoint-every", "-1"),
    ("--gradient-accumulation-steps", "0"), ("--log-every", "0"), ("--num-valid-images", "0"),
])
def test_train_out_of_range_numbers_are_one_line(flag, value, teacher_dir, student_dir, captions, tmp_path,
                                                 distill_cli):
    out = tmp_path / "run"
    one_line(distill_cli(*train_args(teacher_dir, student_dir, captions, out, flag, value)), flag)
    assert not out.exists()


def test_train_with_every_loss_weighted_zero_is_one_line(teacher_dir, student_dir, captions, tmp_path, distill_cli):
    out = tmp_path / "run"
    r = distill_cli(*train_args(teacher_dir, student_dir, captions, out, "--lambda-sd", "0", "--lambda-kd-out", "0",
                                "--lambda-kd-feat", "0"))
    one_line(r, "--lambda-sd", "--lambda-kd-out", "--lambda-kd-feat")
    assert not out.exists()


@pytest.mark.parametrize("record", ["[1, 2]", '{"config": [1]}', '{"config": {"lr": 1}, "x": 1', "\udcff"])
def test_train_resume_with_a_damaged_run_record_is_one_line(record, kd_run, teacher_dir, student_dir, captions,
                                                            tmp_path, distill_cli):
    run = tmp_path / "run"
    shutil.copytree(kd_run, run)
    (run / "distill.json").write_bytes(record.encode("utf-8", "surrogateescape"))
    before = digest(run)
    r = distill_cli(*train_args(teacher_dir, student_dir, captions, run, "--steps", "3", "--resume"))
    one_line(r, str(run / "distill.json"))
    assert digest(run) == before


@pytest.mark.parametrize("extra, changed", [(["--lr", "1e-3"], "lr"), (["--seed", "7"], "seed"),
                                           (["--lambda-kd-feat", "0.5"], "kd")])
def test_train_resume_with_changed_settings_is_one_line(extra, changed, kd_run, teacher_dir, student_dir, captions,
                                                        tmp_path, distill_cli):
    run = tmp_path / "run"
    shutil.copytree(kd_run, run)
    before = digest(run)
    r = distill_cli(*train_args(teacher_dir, student_dir, captions, run, "--steps", "3", "--resume", *extra))
    one_line(r, "--resume", f"{changed} was")
    assert digest(run) == before


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_train_with_a_damaged_unet_is_one_line_naming_it(which, teacher_dir, student_dir, captions, tmp_path,
                                                         distill_cli):
    src = teacher_dir if which == "teacher" else student_dir
    bad = tmp_path / which
    shutil.copytree(src, bad)
    f = bad / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    args = train_args(bad if which == "teacher" else teacher_dir, bad if which == "student" else student_dir,
                      captions, tmp_path / "run")
    one_line(distill_cli(*args), str(bad / "unet"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["truncated-shard", "missing-shard"])
def test_train_rebuilds_a_damaged_precomputed_cache_on_resume(damage, teacher_dir, student_dir, captions, tmp_path,
                                                              distill_cli):
    from safetensors import safe_open

    run = tmp_path / "run"
    args = train_args(teacher_dir, student_dir, captions, run, "--precompute", "--checkpoint-every", "1")
    assert distill_cli(*args).code == 0
    shard = run / "precomputed" / "shard-00000.safetensors"
    if damage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:300])
    else:
        shard.unlink()
    r = distill_cli(*args, "--steps", "2", "--resume")
    assert r.code == 0, r.err
    with safe_open(str(shard), framework="pt") as f:  # whole again
        assert f.get_slice("latent").get_shape()[0] == 2


# ---------------------------------------------------------------------------- distill report / personalize report: inputs
@pytest.mark.parametrize("over, why", [
    ({"fid": "low"}, "fid"), ({"cost": [1, 2]}, "cost"), ({"cost": {"unet_macs": "many"}}, "cost.unet_macs"),
    ({"name": ["a"]}, "name"), ({"n_images": "4"}, "n_images"), ({"is": True}, "is"),
])
def test_distill_report_skips_a_wrong_kind_scores_file_with_a_warning(over, why, tmp_path, distill_cli):
    evals = tmp_path / "evals"
    fake_distill_scores(evals / "good", name="good")
    bad = fake_distill_scores(evals / "bad", **{"name": "bad", **over})
    r = distill_cli("report", evals, "-o", tmp_path / "r")
    lines = r.err.strip().splitlines()
    assert r.code == 1 and len(lines) == 1 and lines[0].startswith(f"warning: skipped {bad}: ") and why in lines[0]
    assert "Traceback" not in r.err
    assert "| good |" in (tmp_path / "r" / "benchmark.md").read_text()
    assert "bad" not in (tmp_path / "r" / "benchmark.csv").read_text()


@pytest.mark.parametrize("kind", ["damaged", "not-utf8", "personalize-scores", "wrong-types", "huge"])
def test_distill_report_of_only_unusable_inputs_is_one_line_naming_one(kind, tmp_path, distill_cli):
    d = tmp_path / "evals" / "x"
    d.mkdir(parents=True)
    f = d / "scores.json"
    if kind == "damaged":
        f.write_text('{"fid": 1.0, "cost": {')
    elif kind == "not-utf8":
        f.write_bytes(b'{"name": "caf\xe9"}')
    elif kind == "personalize-scores":
        fake_personalize_scores(d)
    elif kind == "wrong-types":
        fake_distill_scores(d, fid="low")
    else:
        fake_distill_scores(d, name="x" * (17 << 20))
    r = distill_cli("report", tmp_path / "evals", "-o", tmp_path / "r")
    one_line(r, str(f), "no `distill eval` scores.json to report")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "a-text-file"])
def test_distill_report_input_that_is_no_eval_output_is_one_line(kind, tmp_path, distill_cli):
    x = tmp_path / "x"
    if kind == "empty-dir":
        x.mkdir()
    elif kind == "a-text-file":
        x.write_text("not a scores file\n")
    one_line(distill_cli("report", x, "-o", tmp_path / "r"), str(x))
    assert not (tmp_path / "r").exists()


def test_distill_report_output_that_is_a_file_is_one_line(tmp_path, distill_cli):
    fake_distill_scores(tmp_path / "evals" / "a")
    (tmp_path / "r").write_text("mine")
    one_line(distill_cli("report", tmp_path / "evals", "-o", tmp_path / "r"), f"-o {tmp_path / 'r'}")
    assert (tmp_path / "r").read_text() == "mine"


def test_distill_report_of_a_score_without_fid_or_macs_works(tmp_path, distill_cli):
    """Odd but valid: an eval whose FID is missing (null) or whose cost has no MAC count."""
    fake_distill_scores(tmp_path / "evals" / "a", name="no-fid", fid=None)
    fake_distill_scores(tmp_path / "evals" / "b", name="no-macs", cost={"unet_params": 5})
    r = distill_cli("report", tmp_path / "evals", "-o", tmp_path / "r")
    assert r.code == 0, r.err
    md = (tmp_path / "r" / "benchmark.md").read_text()
    assert "| no-fid | - |" in md and "| no-macs |" in md


def test_personalize_report_skips_a_non_utf8_scores_file_with_a_warning(tmp_path, cli):
    runs = tmp_path / "runs"
    fake_personalize_scores(runs / "dog" / "eval")
    bad = runs / "cat" / "eval" / "scores.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b'{"scores": "caf\xe9"}')
    r = cli("report", runs)
    lines = r.err.strip().splitlines()
    assert r.code == 1 and len(lines) == 1 and lines[0].startswith(f"warning: skipped {bad}: "), r.err


@pytest.mark.parametrize("kind", ["runs-dir-is-a-file", "out-is-a-file"])
def test_personalize_report_wrong_kind_paths_are_one_line(kind, tmp_path, cli):
    runs = tmp_path / "runs"
    fake_personalize_scores(runs / "dog" / "eval")
    if kind == "runs-dir-is-a-file":
        (tmp_path / "f").write_text("x")
        one_line(cli("report", tmp_path / "f"), str(tmp_path / "f"))
    else:
        (tmp_path / "out").write_text("mine")
        one_line(cli("report", runs, "--out", tmp_path / "out"), f"--out {tmp_path / 'out'}")
        assert (tmp_path / "out").read_text() == "mine"
    assert not (runs / "report.md").exists()


# ---------------------------------------------------------------------------- distill prune: inputs
@pytest.mark.parametrize("damage", ["unet-weights", "text-encoder-weights", "unet-config-list", "unet-config-not-utf8",
                                    "unet-config-not-json"])
def test_prune_of_a_damaged_teacher_is_one_line_naming_it(damage, teacher_dir, tmp_path, distill_cli):
    bad = tmp_path / "teacher"
    shutil.copytree(teacher_dir, bad)
    if damage == "unet-weights":
        f = bad / "unet" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:500])
    elif damage == "text-encoder-weights":
        next((bad / "text_encoder").glob("*.safetensors")).write_bytes(b"\x07" * 4096)
    else:
        (bad / "unet" / "config.json").write_bytes({"unet-config-list": b"[1, 2]", "unet-config-not-utf8": b'{"a": "\xe9"}',
                                                    "unet-config-not-json": b"{ nope"}[damage])
    before = digest(bad)
    for dry in ([], ["--dry-run"]):
        if dry and "config" not in damage:
            continue  # --dry-run reads configs only
        one_line(distill_cli("prune", "--teacher", bad, "--arch", "bk-tiny", "-o", tmp_path / "s", *dry), str(bad))
    assert not (tmp_path / "s").exists() and digest(bad) == before


@pytest.mark.parametrize("value", ["7", "0", "-8"])
def test_prune_dry_run_out_of_range_resolution_is_one_line(value, distill_cli):
    one_line(distill_cli("prune", "--teacher", "sd-v1.4", "--arch", "bk-small", "--dry-run", "--resolution", value),
             f"--resolution {value}")


def test_eval_of_a_damaged_base_is_one_line_and_leaves_no_folder(assets, tiny_base, tmp_path, distill_cli):
    bad = tmp_path / "base"
    shutil.copytree(tiny_base, bad)
    f = bad / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:300])
    args = eval_args(assets, tmp_path / "o")
    args[args.index("tiny")] = bad
    one_line(distill_cli(*args), str(bad / "unet"))
    assert not (tmp_path / "o").exists()  # not even generation.json


def test_eval_rescoring_nothing_leaves_no_folder(assets, tmp_path, distill_cli):
    one_line(distill_cli(*eval_args(assets, tmp_path / "o"), "--no-generate"), "images missing")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_eval_damaged_clip_is_one_line_before_generating(damage, tmp_path, assets, distill_cli):
    from _metric_fixtures import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    if damage == "weights":
        victim = next(clip.glob("*.safetensors"))
        victim.write_bytes(victim.read_bytes()[:200])
    else:
        victim = clip / "config.json"
        victim.write_text('{"architectures": [')
    args = eval_args(assets, tmp_path / "o")
    args[args.index("none")] = clip
    one_line(distill_cli(*args), f"--clip {clip}", victim.name)
    assert not (tmp_path / "o").exists()


def test_eval_limit_0_means_every_prompt(assets, tmp_path, distill_cli):
    """Odd but valid, as its help says: --limit 0 is no limit."""
    r = distill_cli(*eval_args(assets, tmp_path / "o"), "--limit", "0", "--no-score")
    assert r.code == 0, r.err
    assert len(list((tmp_path / "o" / "images" / "im32").iterdir())) == len(assets["prompts"].read_text().splitlines())


def test_eval_real_stats_that_is_a_folder_says_so(assets, tmp_path, distill_cli):
    (tmp_path / "stats").mkdir()
    one_line(distill_cli(*eval_args(assets, tmp_path / "o", real_images=None, real_stats=tmp_path / "stats")),
             f"--real-stats {tmp_path / 'stats'}: not a file")
    assert not (tmp_path / "o").exists()


def test_personalize_report_of_a_symlinked_runs_dir_writes_into_it(tmp_path, cli):
    """Odd but valid: RUNS_DIR a symlink (runs -> a bigger disk); the report goes where it points."""
    real = tmp_path / "big-disk" / "runs"
    fake_personalize_scores(real / "dog" / "eval")
    (tmp_path / "runs").symlink_to(real)
    r = cli("report", tmp_path / "runs")
    assert r.code == 0, r.err
    assert (real / "report.md").is_file()


def test_train_data_skip_notice_reads_as_a_warning(caplog):
    """distill train's one notice for undecodable examples has the form of every warning,
    `warning: <what>: <why>` (it goes through logging, whose last-resort handler prints the bare
    message on stderr)."""
    from distill.train_data.batches import _Skips

    with caplog.at_level("WARNING", logger="distill.train_data"):
        _Skips("data/pairs", 2).bad("truncated")
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("warning: --data data/pairs: skipped 1 example"), msg
