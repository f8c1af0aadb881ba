"""In-run monitoring: fit hooks leave the weights and resume exact; --save-every step dirs equal
the weights of an uninterrupted run at that step and load like a finished run (diffusers,
generate); --sample-every grids carry their prompts and seeds; --score-every rows and the best step."""

from __future__ import annotations

import json

import pytest
import torch
from _metric_fixtures import tiny_model_dirs  # noqa: F401 - pytest fixture
from conftest import FAST, kill_after_checkpoint
from PIL import Image
from safetensors.torch import load_file

from personalize.fit import FitConfig, Hook, _eta, fit, make_accelerator
from personalize.monitor import best_step, default_sample_prompts, read_scores


# ---------------------------------------------------------------------------- the loop's hooks
def _toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _loss(ms, step, micro, g):
    # also draws from the global RNG: a hook that consumed global draws would shift these
    x = torch.randn(8, 4, generator=g) + 1e-2 * torch.randn(8, 4)
    return {"loss": ((ms["m"](x) - x.sum(1, keepdim=True)) ** 2).mean()}


def _greedy_hook(calls):
    def hook(step, models):
        calls.append((step, models["m"].training, torch.is_grad_enabled()))
        torch.randn(1000)  # a pipeline drawing latents from the global RNG
        models["m"](torch.randn(3, 4))
    return hook


def _run(d, steps=8, hooks=(), resume=False, every=0):
    torch.manual_seed(123)  # the global RNG the loss draws from
    cfg = FitConfig(steps=steps, lr=1e-2, log_every=2, checkpoint_every=every)
    return fit(make_accelerator("no", 1, None), {"m": _toy()}, _loss, cfg, d, resume=resume, log=lambda s: None,
               hooks=hooks)


def _flat(r):
    return torch.cat([p.detach().flatten() for p in r.models["m"].parameters()])


def test_hooks_leave_the_final_weights_unchanged(tmp_path):
    calls = []
    plain = _run(tmp_path / "a")
    hooked = _run(tmp_path / "b", hooks=[Hook("h", 3, _greedy_hook(calls), at_end=True)])
    assert torch.equal(_flat(plain), _flat(hooked))
    # at 3, 6 and the last step, each in eval mode without grad; training mode restored after
    assert calls == [(3, False, False), (6, False, False), (8, False, False)]
    assert hooked.models["m"].training and set(hooked.hook_seconds) == {"h"}


def test_resume_with_hooks_is_exact_and_reruns_no_earlier_hook(tmp_path):
    def det_loss(ms, step, micro, g):  # per-step draws only: resume-exact by construction
        x = torch.randn(8, 4, generator=g)
        return {"loss": ((ms["m"](x) - x.sum(1, keepdim=True)) ** 2).mean()}

    def run(d, steps, calls, resume=False):
        cfg = FitConfig(steps=steps, lr=1e-2, log_every=2, checkpoint_every=4)
        return fit(make_accelerator("no", 1, None), {"m": _toy()}, det_loss, cfg, d, resume=resume,
                   log=lambda s: None, hooks=[Hook("h", 2, _greedy_hook(calls))])

    ref = run(tmp_path / "a", 8, [])
    run(tmp_path / "b", 4, [])
    later = []
    resumed = run(tmp_path / "b", 8, later, resume=True)
    assert torch.equal(_flat(ref), _flat(resumed))
    assert [c[0] for c in later] == [6, 8]


def test_hook_schedule_and_eta_by_hand():
    h = Hook("samples", 4, lambda s, m: None, at_end=True)  # due at 4, 8 and 10 of 10
    assert [s for s in range(1, 11) if h.due(s, 10)] == [4, 8, 10]
    assert [h.remaining(s, 10) for s in (0, 4, 8, 10)] == [3, 2, 1, 0]
    save = Hook("save", 5, lambda s, m: None, skip_last=True)  # the final outputs are step 10
    assert [s for s in range(1, 11) if save.due(s, 10)] == [5]
    # 6 steps left at 0.5 s, samples due twice more at 2 s each, the save no more (never timed)
    assert _eta(4, 10, 0.5, [h, save], {"samples": [1.0, 3.0]}) == pytest.approx(6 * 0.5 + 2 * 2.0)


def test_best_step_is_the_best_dino_at_enough_clip_t():
    rows = [{"step": 200, "dino": 0.50, "clip_i": 0.7, "clip_t": 0.31},
            {"step": 400, "dino": 0.62, "clip_i": 0.8, "clip_t": 0.29},  # best DINO, prompt fidelity gone
            {"step": 600, "dino": 0.58, "clip_i": 0.8, "clip_t": 0.30}]
    assert best_step(rows, 0.30)["step"] == 600
    assert best_step(rows, 0.0)["step"] == 400
    assert best_step(rows, 0.5) is None


def test_default_sample_prompts_are_instance_recontext_and_property():
    from personalize.subjects import fill_prompt, load_prompts

    protocol = [fill_prompt(t, "sks", "dog") for t in load_prompts("live")]
    assert default_sample_prompts("a sks dog", protocol) == ["a sks dog", "a sks dog in the jungle",
                                                              "a red sks dog"]


# ---------------------------------------------------------------------------- a real (tiny) run
def _lora_args(photos, *extra):
    return ["lora", "--subject", photos, "--class-noun", "dog", "--lr", "1e-2", *FAST, *extra]


def _same_tensors(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lora_step_saves_equal_an_uninterrupted_run_and_samples_change_nothing(photos, tmp_path, cli, tiny_base):
    watched = tmp_path / "watched"
    assert cli(*_lora_args(photos, "--save-every", "2", "--sample-every", "2", "--output-dir", watched)).code == 0
    assert cli(*_lora_args(photos, "--output-dir", tmp_path / "plain")).code == 0
    assert cli(*_lora_args(photos, "--steps", "2", "--output-dir", tmp_path / "two")).code == 0
    final = "pytorch_lora_weights.safetensors"
    # sampling and saving changed nothing of the training
    assert _same_tensors(load_file(watched / final), load_file(tmp_path / "plain" / final))
    step2 = watched / "steps" / "step-000002"
    # step 2 of a 4-step run (constant LR) is the weights of a 2-step run
    assert _same_tensors(load_file(step2 / final), load_file(tmp_path / "two" / final))
    assert not (watched / "steps" / "step-000004").exists()  # the last step is the run itself
    run = json.loads((step2 / "run.json").read_text())
    assert run["status"] == "finished" and run["step"] == 2 and run["method"] == "lora"
    top = json.loads((watched / "run.json").read_text())
    assert top["stats"]["monitor"]["saved_steps"] == [2] and top["stats"]["monitor"]["sample_steps"] == [2, 4]

    # the grid per sample step, prompts and seeds in its metadata; index.html lists them
    for step in (2, 4):
        with Image.open(watched / "samples" / f"step-{step:06d}.png") as im:
            meta = json.loads(im.text["personalize"])
            res = meta["resolution"]
            assert im.size == (3 * res, res)  # three default prompts side by side
        assert meta["step"] == step and meta["seeds"] == [0, 1, 2]
        assert meta["prompts"] == ["a sks dog", "a sks dog in the jungle", "a red sks dog"]
    index = (watched / "samples" / "index.html").read_text()
    assert "step-000002.png" in index and "step-000004.png" in index and "a red sks dog" in index

    # the step dir loads like a finished run: plain diffusers, and `personalize generate`
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.load_lora_weights(step2)
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    r = cli("generate", step2, "--prompt", "a {token} {class}", "-n", "1", "--steps", "2", "-o", tmp_path / "gen")
    assert r.code == 0, r.err
    r = cli("export", step2, "--format", "kohya", "-o", tmp_path / "step2.safetensors")
    assert r.code == 0, r.err
    # and a folder of runs lists the run, not its step dirs
    from personalize.runs import find_run_dirs

    assert find_run_dirs(watched) == [watched] and find_run_dirs(step2) == [step2]


@pytest.mark.slow
def test_resume_with_monitoring_is_exact(photos, tmp_path, cli, monkeypatch):

    args = _lora_args(photos, "--steps", "6", "--checkpoint-every", "3", "--save-every", "2", "--sample-every", "3",
                      "--validation-images", "0")
    assert cli(*args, "--output-dir", tmp_path / "a").code == 0
    whole_again = kill_after_checkpoint(monkeypatch, 3)
    assert cli(*args, "--output-dir", tmp_path / "b").code == 130
    whole_again()
    assert cli(*args, "--output-dir", tmp_path / "b", "--resume").code == 0
    final = "pytorch_lora_weights.safetensors"
    for rel in (final, f"steps/step-000002/{final}", f"steps/step-000004/{final}"):
        assert _same_tensors(load_file(tmp_path / "a" / rel), load_file(tmp_path / "b" / rel)), rel
    for step in (3, 6):
        a = Image.open(tmp_path / "a" / "samples" / f"step-{step:06d}.png")
        b = Image.open(tmp_path / "b" / "samples" / f"step-{step:06d}.png")
        assert list(a.getdata()) == list(b.getdata())


@pytest.mark.slow
def test_full_step_save_is_a_pipeline_with_the_weights_at_that_step(photos, tmp_path, cli):
    args = ["full", "--subject", photos, "--class-noun", "dog", "--lr", "1e-3", *FAST, "--validation-images", "0"]
    assert cli(*args, "--save-every", "2", "--output-dir", tmp_path / "w").code == 0
    assert cli(*args, "--steps", "2", "--output-dir", tmp_path / "two").code == 0
    step2 = tmp_path / "w" / "steps" / "step-000002"
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert _same_tensors(load_file(step2 / part), load_file(tmp_path / "two" / part)), part
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(step2, safety_checker=None)  # a complete pipeline


@pytest.mark.slow
def test_scores_by_step_and_the_best_step(photos, tmp_path, cli, tiny_model_dirs):  # noqa: F811
    out = tmp_path / "scored"
    ev = ["--dino", tiny_model_dirs["dino"], "--clip", tiny_model_dirs["clip"]]
    r = cli(*_lora_args(photos, "--save-every", "2", "--score-every", "2", "--score-prompts", "2",
                        "--score-images", "1", "--validation-images", "0", "--output-dir", out, *ev))
    assert r.code == 0, r.err
    rows = read_scores(out / "scores_by_step.csv")
    assert [x["step"] for x in rows] == [2, 4] and all(x["n_images"] == 2 for x in rows)
    assert all(-1 <= x[m] <= 1 for x in rows for m in ("dino", "clip_i", "clip_t"))
    assert (out / "scores_by_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((out / "run.json").read_text())["stats"]["monitor"]["best_step"]
    want = max(rows, key=lambda x: x["dino"])
    assert best["step"] == want["step"] and best["dir"] == ("." if want["step"] == 4 else "steps/step-000002")
    assert f"best step {want['step']}" in r.out
    # the saved step dir is scored by `eval` like any run
    step2 = out / "steps" / "step-000002"
    r = cli("eval", step2, *ev, "--images-per-prompt", "1", "--steps", "2")
    assert r.code == 0, r.err
    assert (step2 / "eval" / "scores.json").is_file()
    # no step reaches CLIP-T 1.0: said, and recorded as none
    r = cli(*_lora_args(photos, "--score-every", "4", "--score-prompts", "1", "--score-images", "1",
                        "--validation-images", "0", "--min-clip-t", "1.0", "--output-dir", tmp_path / "strict", *ev))
    assert r.code == 0 and "no scored step reached CLIP-T >= 1" in r.out
    assert json.loads((tmp_path / "strict" / "run.json").read_text())["stats"]["monitor"]["best_step"] is None


@pytest.mark.parametrize("flag, value, msg", [("--save-every", "-1", "--save-every must be >= 0"),
                                              ("--min-clip-t", "2", "--min-clip-t must be in [-1, 1]"),
                                              ("--sample-prompts", "/nonexistent/p.txt", "no such file"),
                                              ("--dino", "/nonexistent/dino", "--dino /nonexistent/dino: no such")])
def test_bad_monitoring_flags_are_one_line(photos, tmp_path, cli, flag, value, msg):
    extra = {"--sample-prompts": ["--sample-every", "2"], "--dino": ["--score-every", "2"]}.get(flag, [])
    r = cli(*_lora_args(photos, flag, value, *extra, "--output-dir", tmp_path / "r"))
    assert r.code == 2 and msg in r.err and r.err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_batch_passes_the_new_flags_through(monkeypatch, tmp_path):
    """`personalize batch` builds each subject's TrainConfig from the same generated flags; its
    --dino/--clip (the evaluation group's) also serve --score-every."""
    import personalize.batch as batch_mod
    from personalize.cli import build_parser

    seen = {}

    def fake_run_batch(template, bases, methods, subjects, batch_dir, shard, make_eval):
        seen["template"] = template
        return {"jobs": []}

    monkeypatch.setattr(batch_mod, "run_batch", fake_run_batch)
    monkeypatch.setattr(batch_mod, "select_subjects", lambda names, data_dir: ["dog"])
    monkeypatch.setattr(batch_mod, "print_summary", lambda s: None)
    monkeypatch.setattr(batch_mod, "exit_code", lambda s: 0)
    args = build_parser().parse_args([
        "batch", "--base", "tiny", "--batch-dir", str(tmp_path / "b"), "--save-every", "200", "--sample-every", "100",
        "--score-every", "200", "--min-clip-t", "0.28", "--dino", "/d", "--lr-scheduler", "cosine",
        "--lr-warmup-steps", "50", "--optimizer", "adamw8bit", "--alpha-mask", "--snr-gamma", "5"])
    assert args.func(args) == 0
    t = seen["template"]
    assert (t.save_every, t.sample_every, t.score_every, t.min_clip_t, t.dino) == (200, 100, 200, 0.28, "/d")
    assert (t.lr_scheduler, t.lr_warmup_steps, t.optimizer, t.alpha_mask, t.snr_gamma) == ("cosine", 50, "adamw8bit",
                                                                                          True, 5.0)
    # they change no weights: a rerun may change them without mixing two setups in one table
    assert {"save_every", "sample_every", "score_every", "min_clip_t"} <= batch_mod.RERUN_MAY_CHANGE


@pytest.mark.slow
def test_two_process_run_with_monitoring(tmp_path, tiny_base):
    """Under a two-process launch every rank reaches the hooks' barriers; rank 0 alone writes."""
    import os
    import subprocess
    import sys

    from conftest import write_photos

    photos = write_photos(tmp_path / "photos", n=3)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "personalize", "lora", "--subject", str(photos), "--class-noun", "dog", "--base", str(tiny_base),
           "--steps", "4", "--class-images", "0", "--validation-images", "0", "--validation-steps", "2",
           "--log-every", "1", "--save-every", "2", "--sample-every", "2", "--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PERSONALIZE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "steps" / "step-000002" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000002.png", "step-000004.png"]
