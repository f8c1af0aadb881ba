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


def test_adamw_uses_multi_tensor_kernels_only_on_cuda():
    from personalize.fit import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = FitConfig(steps=1, lr=1e-3)
    assert make_optimizer(params, cfg, on_cuda=False).defaults["foreach"] is False
    assert make_optimizer(params, cfg, on_cuda=True).defaults["foreach"] is True


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
