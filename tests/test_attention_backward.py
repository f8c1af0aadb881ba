"""Inside `fp32_attention_backward`, SDPA calls on the CPU in bf16/fp16 that autograd records keep SDPA's
forward bit for bit and take the flash backward in fp32; every other call is SDPA's own; SDPA is back
after the block (nested, raising); a bf16 LoRA run goes through it."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import FAST
from personalize import attention_backward
from personalize.attention_backward import FlashFp32Backward, fp32_attention_backward
from personalize.sources import load_components

OURS = "FlashFp32BackwardBackward"


def _qkv(queries=64, keys=64, heads=4, dim=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # diffusers' layout: (batch, tokens, heads, dim) seen as (batch, heads, tokens, dim)
    return [torch.randn(2, n, heads, dim, generator=g).to(dtype).transpose(1, 2).requires_grad_()
            for n in (queries, keys, keys)]


def _mask(kind, queries, keys, dtype=torch.bfloat16):
    keep = torch.ones(queries, keys, dtype=torch.bool).tril()
    if kind == "bool":
        return keep
    if kind == "float":
        return torch.zeros(queries, keys, dtype=dtype).masked_fill_(~keep, float("-inf"))
    return None


def _fp32_backward(q, k, v, out, grad, mask, causal):
    """The flash backward op on fp32 upcasts, written out here: what the gradients must equal."""
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.detach(), k.detach(), v.detach(), 0.0,
                                                                        causal, attn_mask=mask)
    f = [t.detach().float() for t in (grad, q, k, v, out)]
    return [g.to(q.dtype) for g in torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *f, lse, 0.0, causal, attn_mask=None if mask is None else mask.float())]


@pytest.mark.parametrize("queries,keys,mask,causal", [(64, 64, None, False), (64, 77, None, False),
                                                      (77, 77, None, True), (77, 77, "bool", False),
                                                      (77, 77, "float", False)])
def test_sdpa_s_forward_bit_for_bit_and_the_backward_in_fp32(queries, keys, mask, causal):
    q, k, v = _qkv(queries, keys)
    m = _mask(mask, queries, keys)
    grad = torch.randn(2, 4, queries, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    with fp32_attention_backward():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
        assert type(out.grad_fn).__name__ == OURS
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert torch.equal(out, ref)
    float_mask = None if m is None else m if m.dtype != torch.bool else \
        torch.zeros(queries, keys, dtype=torch.bfloat16).masked_fill_(~m, float("-inf"))
    for got, want in zip(grads, _fp32_backward(q, k, v, out, grad, float_mask, causal)):
        assert torch.equal(got, want)
    # and closer to exact than SDPA's own bf16 backward
    exact = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), is_causal=causal,
                                           attn_mask=None if m is None else m if m.dtype == torch.bool else m.double())
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad.double())

    def error(gs):
        return max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(gs, exact_grads))
    assert error(grads) < error(ref_grads)


def test_under_autocast_fp32_inputs_as_sdpa_casts_them():
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.scaled_dot_product_attention(q, k, v)
        with fp32_attention_backward():
            out = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32


@pytest.mark.parametrize("case", ["no grad", "fp32", "dropout", "math chosen", "gqa", "learned mask"])
def test_every_other_call_is_sdpa_s_own(case):
    q, k, v = _qkv(dtype=torch.float32 if case == "fp32" else torch.bfloat16)
    kwargs = {"dropout_p": 0.5} if case == "dropout" else {}
    if case == "learned mask":  # a bias that trains: SDPA's own math path gives it its gradient
        kwargs = {"attn_mask": torch.zeros(64, 64, dtype=torch.bfloat16, requires_grad=True)}
    if case == "gqa":
        k, v = (t[:, :2].detach().requires_grad_() for t in (k, v))
        kwargs = {"enable_gqa": True}
    with fp32_attention_backward(), torch.set_grad_enabled(case != "no grad"), \
            sdpa_kernel(SDPBackend.MATH) if case == "math chosen" else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert type(out.grad_fn).__name__ != OURS
    if case == "learned mask":
        out.float().sum().backward()
        assert kwargs["attn_mask"].grad is not None


def test_sdpa_is_back_after_the_block_nested_or_raising():
    sdpa = F.scaled_dot_product_attention
    with fp32_attention_backward():
        with fp32_attention_backward():
            assert F.scaled_dot_product_attention is attention_backward.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is attention_backward.scaled_dot_product_attention  # the outer holds
    assert F.scaled_dot_product_attention is sdpa
    with pytest.raises(RuntimeError, match="boom"), fp32_attention_backward():
        raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is sdpa
    with fp32_attention_backward(enabled=False):
        assert F.scaled_dot_product_attention is sdpa


def test_two_threads_the_last_out_puts_sdpa_back():
    sdpa, inside, leave = F.scaled_dot_product_attention, threading.Barrier(2), threading.Event()

    def run():
        with fp32_attention_backward():
            inside.wait(timeout=30)
            leave.wait(timeout=30)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        with fp32_attention_backward():
            inside.wait(timeout=30)
        held = F.scaled_dot_product_attention is attention_backward.scaled_dot_product_attention  # the thread's block
    finally:
        leave.set()
        t.join(timeout=30)
    assert held and F.scaled_dot_product_attention is sdpa


@pytest.fixture(scope="module")
def models(tiny_base):
    return load_components(tiny_base)


def test_a_model_with_or_without_grad_predicts_the_same(models):
    """--prior base-prediction: the frozen base's prediction (no grad) and a zero adapter's must be equal."""
    c = models
    ids = c["tokenizer"](["a sks dog", "a dog"], padding="max_length", max_length=c["tokenizer"].model_max_length,
                         return_tensors="pt").input_ids
    lat = torch.randn(2, c["unet"].config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    c["text_encoder"].requires_grad_(True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return c["unet"](lat, torch.tensor([500, 500]), c["text_encoder"](ids)[0]).sample
    try:
        with fp32_attention_backward():
            with torch.no_grad():
                a = step()
            b = step()
    finally:
        c["text_encoder"].requires_grad_(False)
    assert b.grad_fn is not None and torch.equal(a, b.detach())


def test_a_bf16_lora_run_uses_it(photos, tmp_path, cli, monkeypatch):
    calls, real = [], FlashFp32Backward.apply
    monkeypatch.setattr(FlashFp32Backward, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    r = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--validation-images", "0",
            "--mixed-precision", "bf16", "--output-dir", tmp_path / "run")
    assert r.code == 0, r.err
    assert calls  # the U-Net's and the text encoder's attentions
