"""HRA's and BOFT's rotations on the input: the outputs and gradients of peft's layers (fp32 to float
error, bf16 autocast to its rounding), nothing in x in built, peft's forward where it does not apply and
after the block, and `hra` and `boft` runs through it."""

from __future__ import annotations

import pytest
import torch
from peft import BOFTConfig, HRAConfig, get_peft_model
from torch import nn

from conftest import FAST
from personalize import orthogonal_inputs
from personalize.orthogonal_inputs import orthogonal_on_inputs

CONFIGS = {"hra": lambda gs=False: HRAConfig(r=4, target_modules=["lin"], apply_GS=gs),
           "boft": lambda gs=False: BOFTConfig(boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=0, target_modules=["lin"])}


def _model(method, bias=True, apply_gs=False):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(24, 16, bias=bias))
    model = get_peft_model(model, CONFIGS[method](apply_gs))
    with torch.no_grad():  # peft starts at the identity: make it a real rotation (and BOFT's scale not 1)
        for name, p in model.named_parameters():
            if any(k in name for k in ("hra_u", "boft_R", "boft_s")):
                p.copy_(torch.randn_like(p) * (0.3 if "boft" in name else 1) + (1 if "boft_s" in name else 0))
    return model.eval()  # BOFT's multiplicative dropout draws in training mode


def _out_and_grads(model, x, autocast):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    trained = [p for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.float().pow(2).sum(), (x, *trained))
    return (y.float(), *(g.float() for g in grads))


@pytest.mark.parametrize("method", ["hra", "boft"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_outputs_and_gradients_are_peft_s(method, bias, autocast):
    model = _model(method, bias=bias)
    x = torch.randn(3, 5, 24)
    ref = _out_and_grads(model, x, autocast)
    with orthogonal_on_inputs([model]) as n:
        assert n == 1
        out = _out_and_grads(model, x, autocast)
    assert len(out) == len(ref) >= 3
    for a, b in zip(out, ref):
        if autocast:  # bf16 rounds peft's dense matrices or the rotated input here: equal to bf16's precision
            assert (a - b).norm() <= 2e-2 * b.norm()
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    lin = model.base_model.model.lin
    assert not torch.allclose(ref[0], lin.base_layer(x))  # the adapter does change the output
    assert "forward" not in lin.__dict__  # peft's forward back


@pytest.mark.parametrize("method", ["hra", "boft"])
def test_nothing_in_x_in_is_built(method, monkeypatch):
    model = _model(method)
    monkeypatch.setattr(torch, "eye", lambda n, *a, **k: pytest.fail(f"built an {n} x {n} matrix") if n == 24
                        else torch.ones(n).diag())
    monkeypatch.setattr(torch, "block_diag", lambda *a: pytest.fail("built a block-diagonal matrix"))
    with orthogonal_on_inputs([model]):
        model(torch.randn(2, 24))


@pytest.mark.parametrize("case", ["apply_GS", "merged", "disabled"])
def test_where_it_does_not_apply_peft_s_forward_runs(case, monkeypatch):
    model = _model("hra", apply_gs=case == "apply_GS")
    layer = model.base_model.model.lin
    x = torch.randn(2, 24)
    if case == "merged":
        layer.merge()
    ref = layer.base_layer(x) if case == "disabled" else model(x)
    calls, real = [], type(layer).forward
    monkeypatch.setattr(type(layer), "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with orthogonal_on_inputs([model]):
        with model.disable_adapter() if case == "disabled" else torch.no_grad():
            out = model(x)
    assert calls and torch.equal(out, ref)


@pytest.mark.parametrize("method", ["hra", "boft"])
def test_a_run_goes_through_it(method, photos, tmp_path, cli, monkeypatch):
    calls, real = [], getattr(orthogonal_inputs, f"_{method}")

    def wrap(m, original):
        f = real(m, original)
        return lambda *a, **k: calls.append(1) or f(*a, **k)
    monkeypatch.setattr(orthogonal_inputs, f"_{method}", wrap)
    r = cli(method, "--subject", photos, "--class-noun", "dog", *FAST, "--validation-images", "0",
            "--output-dir", tmp_path / "run")
    assert r.code == 0, r.err
    assert calls


def test_boft_butterfly_factors_are_peft_s_dense_product(monkeypatch):
    """Two butterfly factors (their permutations not the identity): peft's own formula, built densely
    here (without its CUDA kernel peft makes one factor only), against the gathers and block products."""
    from peft.tuners.boft import layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)  # so that it keeps the factors asked for
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(24, 16))
    model = get_peft_model(model, BOFTConfig(boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=2,
                                             target_modules=["lin"])).eval()
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.boft_R["default"].copy_(torch.randn_like(lin.boft_R["default"]) * 0.3)
        lin.boft_s["default"].copy_(torch.rand_like(lin.boft_s["default"]) + 0.5)
    n, d, h, _ = lin.boft_R["default"].shape
    assert n == 2 and not torch.equal(lin.boft_P[1], torch.eye(24))
    blocks = lin.cayley_batch(lin.boft_R["default"].view(n * d, h, h)).view(n, d, h, h)
    factors = [lin.boft_P[i] @ torch.block_diag(*blocks[i]) @ lin.boft_P[i].t() for i in range(n)]
    x = torch.randn(3, 24)
    b = lin.base_layer.bias
    ref = (lin.base_layer(x @ (factors[1] @ factors[0])) - b) * lin.boft_s["default"].squeeze(-1) + b
    with orthogonal_on_inputs([model]):
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_boft_on_a_quantized_base_layer_is_peft_s(quantization):
    """`--base-quantization` with boft: the frozen layer is bitsandbytes', called as it is."""
    from personalize.adapters import ADAPTER_METHODS, attach_adapter
    from personalize.config import TrainConfig
    from personalize.quantize import quantize_frozen

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(64, 64))
    quantize_frozen(model, quantization, torch.float32, "cpu", torch.float32)
    attach_adapter(model, ADAPTER_METHODS["boft"].build(TrainConfig(method="boft", subject="-", boft_block_num=4,
                                                                   lora_unet_targets=["to_q"]), "unet"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_R" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.eval()
    x = torch.randn(3, 64)
    ref = _out_and_grads(model, x, False)
    with orthogonal_on_inputs([model]) as n:
        assert n == 1
        out = _out_and_grads(model, x, False)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
