"""Short attentions in bf16 on the CPU go through SDPA's math kernel inside the block, with or without
grad; the long ones and fp32 calls keep flash; the forwards come back after; a bf16 LoRA run uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST
from personalize.short_attention import math_for_short_attention
from personalize.sources import load_components


@pytest.fixture(scope="module")
def models(tiny_base):
    return load_components(tiny_base)


def _spy(monkeypatch) -> list:
    """(queries, keys, flash allowed) of every SDPA call: sdpa_kernel's choice is a global flag."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append((q.shape[-2], k.shape[-2], torch.backends.cuda.flash_sdp_enabled()))
        return real(q, k, v, *a, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def _step(c, dtype=torch.bfloat16, size=16):
    ids = c["tokenizer"](["a sks dog", "a dog"], padding="max_length", max_length=c["tokenizer"].model_max_length,
                         return_tensors="pt").input_ids
    lat = torch.randn(2, c["unet"].config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        emb = c["text_encoder"](ids)[0]
        return c["unet"](lat, torch.tensor([500, 500]), emb).sample


def test_short_ones_go_through_math_long_ones_keep_flash(models, monkeypatch):
    calls = _spy(monkeypatch)
    unet, te = models["unet"], models["text_encoder"]
    tokens = te.config.max_position_embeddings
    limit = 16 * 16 * tokens - 1  # a 16x16 map's cross-attention is just over, the text's 77 x 77 well under
    with math_for_short_attention([unet, te], max_pairs=limit) as n:
        assert n == sum(1 for m in [*unet.modules(), *te.modules()] if type(m).__name__ in ("Attention", "CLIPAttention"))
        _step(models)
    assert calls and torch.backends.cuda.flash_sdp_enabled()  # the global flag is back
    for q, k, flash in calls:
        assert flash == (q * k > limit), (q, k, flash)
    assert {flash for *_, flash in calls} == {True, False}  # both kinds were exercised
    assert all("forward" not in m.__dict__ for m in [*unet.modules(), *te.modules()])


@pytest.mark.parametrize("enabled,dtype", [(False, torch.bfloat16), (True, torch.float32)])
def test_off_or_fp32_every_call_keeps_flash(models, monkeypatch, enabled, dtype):
    calls = _spy(monkeypatch)
    with math_for_short_attention([models["unet"], models["text_encoder"]], enabled=enabled):
        _step(models, dtype)
    assert calls and all(flash for *_, flash in calls)


def test_with_or_without_grad_the_same_kernel_and_output(models):
    """--prior base-prediction: the base's prediction (no grad) and a zero adapter's must be equal."""
    with math_for_short_attention([models["unet"], models["text_encoder"]]):
        with torch.no_grad():
            a = _step(models)
        b = _step(models)
    assert torch.equal(a, b.detach())


def test_the_outputs_agree_with_flash_s_to_bf16_rounding(models):
    ref = _step(models).float()
    with math_for_short_attention([models["unet"], models["text_encoder"]]):
        out = _step(models).float()
    assert not torch.equal(out, ref)  # another kernel ran
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)


def test_a_bf16_lora_run_uses_it(photos, tmp_path, cli, monkeypatch):
    calls = _spy(monkeypatch)
    r = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--validation-images", "0",
            "--mixed-precision", "bf16", "--output-dir", tmp_path / "run")
    assert r.code == 0, r.err
    assert any(not flash for *_, flash in calls)  # the tiny base's attentions are all short
