"""--pack-frozen-convs: frozen convs computed from weights packed once for oneDNN give the outputs
and input gradients of F.conv2d bit for bit, hold the two packed copies instead of the plain weight
while the block runs, and get the plain weight back exactly; a LoRA run with it saves the same adapter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import FAST
from personalize import packed_convs
from personalize.packed_convs import available, packed_frozen_convs

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN")


def _frozen(dtype, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 32, 3, **kw).to(dtype)
    conv.requires_grad_(False)
    return conv


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("padding", [1, 0])
def test_outputs_and_input_gradients_are_f_conv2d_s_and_the_weight_comes_back(autocast, padding):
    dtype = torch.bfloat16
    conv = _frozen(dtype, padding=padding)
    plain = conv.weight.detach().clone()
    x = torch.randn(2, 48, 9, 9, requires_grad=True)
    grad = torch.randn(2, 32, 9 - 2 * (1 - padding), 9 - 2 * (1 - padding))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = conv(x if autocast else x.to(dtype))
        (gx,) = torch.autograd.grad(y, x, grad.to(y.dtype))
        return y, gx

    want = run()
    with packed_frozen_convs(conv, True, min_bytes=0) as n:
        assert n == 1
        for _ in range(2):  # packed on the first call, reused on the next
            got = run()
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert conv.weight is None and conv._packed_fwd.is_mkldnn  # the plain weight is not held meanwhile
    assert torch.equal(conv.weight, plain) and not conv.weight.requires_grad and "forward" not in conv.__dict__
    assert torch.equal(run()[0], want[0])


def test_what_is_not_packed():
    model = nn.Sequential(_frozen(torch.bfloat16, padding=1), _frozen(torch.bfloat16, stride=2),
                          nn.Conv2d(48, 32, 3).to(torch.bfloat16),  # trained
                          _frozen(torch.float32, padding=1))  # fp32: its backward is another kernel
    with packed_frozen_convs(model, True, min_bytes=0) as n:
        assert n == 1
    with packed_frozen_convs(model, True) as n:  # the default threshold: 16 MB weights only
        assert n == 0
    with packed_frozen_convs(model, False, min_bytes=0) as n:
        assert n == 0


def test_a_lora_run_with_it_saves_the_same_adapter(photos, tmp_path, cli, monkeypatch):
    calls = []
    real = packed_convs._PackedConv.apply
    monkeypatch.setattr(packed_convs, "MIN_BYTES", 0)  # the tiny base's convs are all small
    monkeypatch.setattr(packed_convs._PackedConv, "apply", lambda *a: calls.append(1) or real(*a))
    # bf16 named: the frozen base is bf16 then on any CPU (where bf16 is not native it is only slower)
    args = ["lora", "--subject", photos, "--class-noun", "dog", *FAST, "--lr", "1e-2", "--validation-images", "0",
            "--mixed-precision", "bf16"]
    assert cli(*args, "--output-dir", tmp_path / "plain").code == 0
    assert not calls
    r = cli(*args, "--output-dir", tmp_path / "packed", "--pack-frozen-convs")
    assert r.code == 0, r.err
    assert calls  # the run's convs went through the packed path
    a = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "packed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
