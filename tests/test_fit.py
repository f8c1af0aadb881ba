"""The shared fit loop on a toy model: exact resume, checkpoint rotation, NaN guard."""

from __future__ import annotations

import pytest
import torch

from personalize.errors import UserError
from personalize.checkpoints import list_checkpoints
from personalize.fit import FitConfig, fit, make_accelerator


def _toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _loss(ms, step, micro, g):
    x = torch.randn(8, 4, generator=g)
    err = ms["m"](x) - x.sum(1, keepdim=True)
    return {"loss": (err**2).mean(), "mae": err.abs().mean()}


def _run(d, steps, resume=False, every=0, accum=1):
    cfg = FitConfig(steps=steps, lr=1e-2, checkpoint_every=every, log_every=2, gradient_accumulation_steps=accum)
    return fit(make_accelerator("no", accum, None), {"m": _toy()}, _loss, cfg, d, resume=resume, log=lambda s: None)


def _flat(r):
    return torch.cat([p.detach().flatten() for p in r.models["m"].parameters()])


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_exact(tmp_path, accum):
    a = _run(tmp_path / "a", 8, accum=accum)
    _run(tmp_path / "b", 5, every=5, accum=accum)
    b = _run(tmp_path / "b", 8, resume=True, accum=accum)
    assert torch.equal(_flat(a), _flat(b))
    assert a.losses == b.losses and set(a.losses) == {"loss", "mae"}


def test_training_reduces_loss_and_keeps_one_checkpoint(tmp_path):
    r = _run(tmp_path, 40, every=10)
    rows = (tmp_path / "logs" / "loss.csv").read_text().splitlines()
    first, last = float(rows[1].split(",")[1]), float(rows[-1].split(",")[1])
    assert last < first
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40]
    assert {p.name for p in (tmp_path / "checkpoints" / "step-000040").iterdir()} == {
        "trainable.safetensors", "optimizer.safetensors", "state.json"}
    assert r.step == 40


def test_nan_loss_stops_with_a_user_error(tmp_path):
    def bad(ms, step, micro, g):
        return {"loss": ms["m"](torch.randn(2, 4, generator=g)).sum() * float("nan")}

    with pytest.raises(UserError, match="loss became nan"):
        fit(make_accelerator("no", 1, None), {"m": _toy()}, bad, FitConfig(steps=4, lr=1e-3, log_every=2), tmp_path,
            log=lambda s: None)


def test_frozen_only_model_is_rejected(tmp_path):
    m = _toy().requires_grad_(False)
    with pytest.raises(ValueError):
        fit(make_accelerator("no", 1, None), {"m": m}, _loss, FitConfig(steps=1, lr=1e-3), tmp_path)


def test_8bit_adam_on_cpu_falls_back_with_a_message(tmp_path):
    said = []
    cfg = FitConfig(steps=1, lr=1e-3, use_8bit_adam=True)
    fit(make_accelerator("no", 1, None), {"m": _toy()}, _loss, cfg, tmp_path, log=said.append)
    assert any("8-bit AdamW needs CUDA" in s for s in said)


def test_gradient_checkpointing_auto_is_off_on_cpu_and_flags_win():
    from personalize.config import TrainConfig

    assert TrainConfig(method="lora", subject="x").resolved_gradient_checkpointing("cpu") is False
    assert TrainConfig(method="lora", subject="x", gradient_checkpointing=True).resolved_gradient_checkpointing("cpu")


def test_bf16_note_only_where_bf16_would_be_emulated(monkeypatch):
    import personalize.precision as tr

    monkeypatch.setattr(tr, "cpu_bf16_is_native", lambda: False)
    assert "no native bf16" in tr.bf16_cpu_note("bf16", "cpu")
    assert tr.bf16_cpu_note("no", "cpu") is None
    monkeypatch.setattr(tr, "cpu_bf16_is_native", lambda: True)
    assert tr.bf16_cpu_note("bf16", "cpu") is None


@pytest.mark.parametrize("native, cpu, expected", [(True, True, "bf16"), (False, True, "no"), (True, False, "fp16"),
                                                   (False, False, "fp16")])
def test_auto_precision_is_bf16_only_on_cpus_that_run_it_natively(monkeypatch, native, cpu, expected):
    import personalize.precision as tr

    monkeypatch.setattr(tr, "cpu_bf16_is_native", lambda: native)
    assert tr.resolve_mixed_precision("auto", cpu=cpu) == expected
    assert tr.resolve_mixed_precision("no", cpu=cpu) == "no"  # an explicit choice wins


def test_adamw_is_fused_on_the_cpu_and_multi_tensor_on_cuda():
    from personalize.fit import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = FitConfig(steps=1, lr=1e-3)
    cpu, cuda = make_optimizer(params, cfg, on_cuda=False), make_optimizer(params, cfg, on_cuda=True)
    assert cpu.defaults["fused"] is True and not cpu.defaults["foreach"]
    assert cuda.defaults["foreach"] is True and not cuda.defaults["fused"]


def test_the_fused_cpu_step_is_the_per_tensor_loop_s():
    from personalize.fit import make_optimizer

    torch.manual_seed(0)
    init = [torch.randn(37, 5), torch.randn(11)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    cfg = FitConfig(steps=1, lr=1e-2)
    opt = make_optimizer(ours, cfg, on_cuda=False)
    loop = torch.optim.AdamW(ref, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                             eps=cfg.adam_epsilon, foreach=False)
    for _ in range(4):
        grads = [torch.randn_like(t) for t in init]
        for ps, o in ((ours, opt), (ref, loop)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], init[0])  # it did step


def _run_keep(d, steps, resume=False, every=0, kept=2, log=lambda s: None):
    cfg = FitConfig(steps=steps, lr=1e-2, checkpoint_every=every, log_every=2, checkpoints_kept=kept)
    return fit(make_accelerator("no", 1, None), {"m": _toy()}, _loss, cfg, d, resume=resume, log=log)


@pytest.mark.parametrize("damage", ["truncate", "zero-bytes", "garbage", "bad-json", "wrong-json-type"])
def test_resume_passes_over_a_damaged_newest_checkpoint_saying_so(tmp_path, damage):
    ref = _run_keep(tmp_path / "ref", 8)
    d = tmp_path / "run"
    _run_keep(d, 6, every=3)  # checkpoints at 3 and 6
    newest = d / "checkpoints" / "step-000006"
    f = newest / ("state.json" if "json" in damage else "trainable.safetensors")
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "zero-bytes": b"", "garbage": b"\x00garbage" * 40,
                   "bad-json": b"{", "wrong-json-type": b"[1, 2]"}[damage])
    said = []
    r = _run_keep(d, 8, resume=True, log=said.append)
    assert any("step-000006: damaged" in s and "trying the one before" in s for s in said), said
    assert any("resuming from" in s and "step-000003" in s for s in said)
    assert torch.equal(_flat(r), _flat(ref))  # resumed from step 3: still exact


def test_resume_with_only_damaged_checkpoints_is_one_line(tmp_path):
    d = tmp_path / "run"
    _run_keep(d, 3, every=3, kept=1)
    (d / "checkpoints" / "step-000003" / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no intact checkpoint") as e:
        _run_keep(d, 6, resume=True)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- --lr-scheduler, --optimizer
def _lrs(name, warmup, steps=10, n=10):
    """The LR each optimizer step 1..n trains with (what make_lr_scheduler gives the optimizer)."""
    from personalize.fit import make_lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(opt, FitConfig(steps=steps, lr=1.0, lr_scheduler=name, lr_warmup_steps=warmup))
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_match_a_hand_computation():
    import math

    # diffusers' schedules at s = step - 1 (warm-up from 0), total T = 10, warm-up w
    assert _lrs("constant", 0) == [1.0] * 10
    assert _lrs("constant_with_warmup", 4) == pytest.approx([0, .25, .5, .75, 1, 1, 1, 1, 1, 1])
    w, T = 2, 10
    cos = [s / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (T - w))) for s in range(10)]
    assert _lrs("cosine", w) == pytest.approx(cos)
    lin = [s / w if s < w else (T - s) / (T - w) for s in range(10)]
    assert _lrs("linear", w) == pytest.approx(lin)
    # polynomial, power 1, lr_end 1e-7 (diffusers' defaults): linear decay onto lr_end
    poly = [s / w if s < w else (1 - 1e-7) * (1 - (s - w) / (T - w)) + 1e-7 for s in range(10)]
    assert _lrs("polynomial", w) == pytest.approx(poly)
    # --lr-warmup-steps alone (it predates --lr-scheduler) still warms up
    assert _lrs("constant", 4) == _lrs("constant_with_warmup", 4)


def test_first_warmup_step_is_at_lr_zero_so_weights_do_not_move(tmp_path):
    before = _flat_model(_toy())
    cfg = FitConfig(steps=1, lr=1e-1, lr_scheduler="constant_with_warmup", lr_warmup_steps=5)
    r = fit(make_accelerator("no", 1, None), {"m": _toy()}, _loss, cfg, tmp_path, log=lambda s: None)
    assert torch.equal(_flat(r), before)
    cfg = FitConfig(steps=1, lr=1e-1)
    r = fit(make_accelerator("no", 1, None), {"m": _toy()}, _loss, cfg, tmp_path / "b", log=lambda s: None)
    assert not torch.equal(_flat(r), before)


def _flat_model(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("sched", ["cosine", "linear", "constant_with_warmup"])
def test_resume_is_exact_under_every_schedule(tmp_path, sched):
    def run(d, resume=False, every=0):
        cfg = FitConfig(steps=8, lr=1e-2, lr_scheduler=sched, lr_warmup_steps=3, checkpoint_every=every, log_every=2)
        return fit(make_accelerator("no", 1, None), {"m": _toy()}, _loss, cfg, d, resume=resume, log=lambda s: None)

    # the interrupted run must be the same 8-step schedule: kill it after its step-5 checkpoint
    import personalize.checkpoints as ck

    a = run(tmp_path / "a")
    real = ck.save_checkpoint

    def die(run_dir, step, *x, **k):
        real(run_dir, step, *x, **k)
        if step == 5:
            raise KeyboardInterrupt

    ck.save_checkpoint = die
    try:
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "b", every=5)
    finally:
        ck.save_checkpoint = real
    b = run(tmp_path / "b", resume=True)
    assert torch.equal(_flat(a), _flat(b))


def test_prodigy_trains_and_resumes_exactly(tmp_path):
    pytest.importorskip("prodigyopt")

    def run(d, steps, resume=False, every=0):
        cfg = FitConfig(steps=steps, lr=1.0, optimizer="prodigy", checkpoint_every=every, log_every=2)
        return fit(make_accelerator("no", 1, None), {"m": _toy()}, _loss, cfg, d, resume=resume, log=lambda s: None)

    a = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3, every=3)
    b = run(tmp_path / "b", 6, resume=True)
    assert torch.equal(_flat(a), _flat(b))
    adamw = fit(make_accelerator("no", 1, None), {"m": _toy()}, _loss, FitConfig(steps=6, lr=1.0), tmp_path / "c",
                log=lambda s: None)
    assert not torch.equal(_flat(a), _flat(adamw))


def test_optimizer_choice_and_the_8bit_alias():
    import prodigyopt  # noqa: F401 - installed by the test extra

    from personalize.fit import make_optimizer, optimizer_name

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_name(FitConfig(steps=1, lr=1, use_8bit_adam=True)) == "adamw8bit"
    assert type(make_optimizer(params, FitConfig(steps=1, lr=1.0, optimizer="prodigy"), False)).__name__ == "Prodigy"
    said = []
    opt = make_optimizer(params, FitConfig(steps=1, lr=1e-3, optimizer="adamw8bit"), False, log=said.append)
    assert isinstance(opt, torch.optim.AdamW) and "8-bit AdamW needs CUDA" in said[0]


def test_prodigy_without_its_extra_is_one_line_exit_2(monkeypatch, cli, photos, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what a missing package looks like to import
    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--base", "tiny", "--optimizer", "prodigy",
            "--output-dir", tmp_path / "r")
    assert r.code == 2 and r.err.strip().count("\n") == 0
    assert "pip install 'personalize[prodigy]'" in r.err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, value, msg", [("--lr-scheduler", "cosine_restarts", "--lr-scheduler must be one of"),
                                              ("--optimizer", "sgd", "--optimizer must be one of")])
def test_unknown_scheduler_or_optimizer_is_one_line(cli, photos, tmp_path, flag, value, msg):
    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--base", "tiny", flag, value,
            "--output-dir", tmp_path / "r")
    assert r.code == 2 and msg in r.err and r.err.strip().count("\n") == 0
