"""HRA's reflections on the input: the output and gradients of peft's HRA layer (fp32 to float error,
bf16 autocast to its rounding), peft's forward where it does not apply and after the block, and an
`hra` run through it."""

from __future__ import annotations

import pytest
import torch
from peft import HRAConfig, get_peft_model
from torch import nn

from conftest import FAST
from personalize import hra_inputs
from personalize.hra_inputs import hra_on_inputs


def _model(apply_gs=False, bias=True):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(24, 16, bias=bias))
    model = get_peft_model(model, HRAConfig(r=4, target_modules=["lin"], apply_GS=apply_gs))
    with torch.no_grad():  # peft starts at the identity (pairs of equal reflections): make it a real rotation
        for name, p in model.named_parameters():
            if "hra_u" in name:
                p.copy_(torch.randn_like(p))
    return model


def _out_and_grads(model, x, autocast):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    u = next(p for n, p in model.named_parameters() if "hra_u" in n)
    gx, gu = torch.autograd.grad(y.float().pow(2).sum(), (x, u))
    return y.float(), gx.float(), gu


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_outputs_and_gradients_are_peft_s(bias, autocast):
    model = _model(bias=bias)
    x = torch.randn(3, 5, 24)
    ref = _out_and_grads(model, x, autocast)
    with hra_on_inputs([model]) as n:
        assert n == 1
        out = _out_and_grads(model, x, autocast)
    for a, b in zip(out, ref):
        if autocast:  # bf16 rounds W H (peft) or x H^T (here): the same to bf16's precision, as a whole
            assert (a - b).norm() <= 2e-2 * b.norm()
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ref[0], model.base_model.model.lin.base_layer(x))  # the adapter does rotate
    assert "forward" not in model.base_model.model.lin.__dict__  # peft's forward back


def test_the_weight_is_never_built(monkeypatch):
    model = _model()
    layer = model.base_model.model.lin
    monkeypatch.setattr(type(layer), "get_delta_weight", lambda *a, **k: pytest.fail("built the weight"))
    with hra_on_inputs([model]):
        model(torch.randn(2, 24))


@pytest.mark.parametrize("case", ["apply_GS", "merged", "disabled"])
def test_where_it_does_not_apply_peft_s_forward_runs(case, monkeypatch):
    model = _model(apply_gs=case == "apply_GS")
    layer = model.base_model.model.lin
    x = torch.randn(2, 24)
    if case == "merged":
        layer.merge()
    ref = (layer.base_layer(x) if case == "disabled" else model(x))
    calls = []
    real = type(layer).forward
    monkeypatch.setattr(type(layer), "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with hra_on_inputs([model]):
        if case == "disabled":
            with model.disable_adapter():
                out = model(x)
        else:
            out = model(x)
    assert calls and torch.equal(out, ref)


def test_an_hra_run_goes_through_it(photos, tmp_path, cli, monkeypatch):
    calls, real = [], hra_inputs._wrap

    def wrap(m, original):
        f = real(m, original)
        return lambda *a, **k: calls.append(1) or f(*a, **k)
    monkeypatch.setattr(hra_inputs, "_wrap", wrap)
    r = cli("hra", "--subject", photos, "--class-noun", "dog", *FAST, "--validation-images", "0",
            "--output-dir", tmp_path / "run")
    assert r.code == 0, r.err
    assert calls
