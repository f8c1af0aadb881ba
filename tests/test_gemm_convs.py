"""Frozen convs as im2col + GEMM: outputs and input gradients those of F.conv2d (to the last bits of
the dtype), only where the weight dominates the input, the plain weight and forward back after the
block, half storage's forward left to itself, and a LoRA run through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FAST
from personalize import gemm_convs
from personalize.gemm_convs import frozen_convs_as_gemm
from personalize.half_storage import store_frozen_in_half


def _frozen(c_in=48, c_out=32, k=3, dtype=torch.float32, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, **kw).to(dtype)
    conv.requires_grad_(False)
    return conv


def _spy(monkeypatch) -> list:
    calls, real = [], gemm_convs._GemmConv.apply
    monkeypatch.setattr(gemm_convs._GemmConv, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def _run(conv, x, grad, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = conv(x)
    (gx,) = torch.autograd.grad(y, x, grad.to(y.dtype))
    return y.float(), gx.float()


@pytest.mark.parametrize("k, stride", [(3, 1), (1, 1), (3, 2)])  # (3, 2): a U-Net's downsampler
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["fp32", "bf16 autocast", "channels_last input"])
def test_outputs_and_input_gradients_are_f_conv2d_s(monkeypatch, k, stride, bias, mode):
    calls = _spy(monkeypatch)
    autocast = mode == "bf16 autocast"
    conv = _frozen(k=k, bias=bias, stride=stride, dtype=torch.bfloat16 if autocast else torch.float32)
    plain = conv.weight.detach().clone()
    x = torch.randn(2, 48, 5, 7)
    if mode == "channels_last input":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(2, 32, 5, 7)[:, :, ::stride, ::stride]  # odd sizes: the last row/column of a stride-2 pad
    ref = _run(conv, x, grad, autocast)
    with frozen_convs_as_gemm(conv, min_ratio=0) as n:
        assert n == 1
        out = _run(conv, x, grad, autocast)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(calls) == 1
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol)
    # after the block: the plain layout, the same values, the class's forward
    assert conv.weight.is_contiguous() and torch.equal(conv.weight, plain) and "forward" not in conv.__dict__
    assert not conv.weight.requires_grad


def test_only_where_the_weight_dominates_its_im2col_rows(monkeypatch):
    calls = _spy(monkeypatch)
    conv, down, one = _frozen(64, 64), _frozen(64, 64, stride=2), _frozen(64, 64, k=1)  # 36864, 36864, 4096 weights
    with frozen_convs_as_gemm(nn.ModuleList([conv, down, one]), min_ratio=2):
        conv(torch.randn(1, 64, 4, 8))  # rows of 9 x 64: 18432 elements, ratio 2
        conv(torch.randn(1, 64, 5, 7))  # 20160: under 2
        down(torch.randn(1, 64, 8, 16))  # a quarter of the positions: 18432 again
        down(torch.randn(1, 64, 9, 16))  # 5 x 8 positions: 23040
        one(torch.randn(1, 64, 4, 8))  # 1x1: the rows are the input, 2048
        one(torch.randn(1, 64, 5, 7))
    assert calls == [torch.Size([1, 64, 4, 8]), torch.Size([1, 64, 8, 16]), torch.Size([1, 64, 4, 8])]


def test_what_is_never_lowered(monkeypatch):
    calls = _spy(monkeypatch)
    model = nn.Sequential(_frozen(stride=(1, 2)), _frozen(48, 48, k=3), nn.Conv2d(48, 48, 3, padding=1),
                          nn.Conv2d(48, 48, 3, padding=0).requires_grad_(False), _frozen(dilation=2))
    with frozen_convs_as_gemm(model, min_ratio=0) as n:
        assert n == 1  # unequal strides, a trained weight, "valid" padding, dilation: not lowerable
        model[1](torch.randn(1, 48, 4, 4))
    with frozen_convs_as_gemm(model, enabled=False) as n:
        assert n == 0
    assert len(calls) == 1


def test_half_stored_weights_keep_half_storage_s_forward(monkeypatch):
    calls = _spy(monkeypatch)
    conv = _frozen()
    store_frozen_in_half(conv)  # fp16 weights, fp32 arithmetic: not the compute dtype, so not lowered
    own = conv.__dict__.get("forward")
    x = torch.randn(1, 48, 4, 4)
    ref = conv(x)
    with frozen_convs_as_gemm(conv, min_ratio=0):
        out = conv(x)
    assert not calls and torch.equal(out, ref)
    assert conv.__dict__.get("forward") is own and conv.weight.dtype == torch.float16


def test_a_lora_run_goes_through_it(photos, tmp_path, cli, monkeypatch):
    calls = _spy(monkeypatch)
    monkeypatch.setattr(gemm_convs, "MIN_RATIO", 0)  # the tiny base's convs are all small
    r = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--validation-images", "0",
            "--output-dir", tmp_path / "run")
    assert r.code == 0, r.err
    assert calls
