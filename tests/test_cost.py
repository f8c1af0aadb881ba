"""personalize.cost: counted parameters and MACs of whole pipelines, on the real registry configs
(meta device: no weights), against BK-SDM's published sizes and an independent count."""

from __future__ import annotations

import math

import pytest

from personalize.cost import pipeline_cost, registry_cost


def _card(n: int) -> float:
    # the BK-SDM cards round up to two decimals of a billion (SD-v1.4 1.032B -> "1.04B")
    return math.ceil(n / 1e7 - 1e-9) / 100


@pytest.mark.slow
@pytest.mark.parametrize("name, unet, whole", [
    ("bk-sdm-base", 0.58, 0.76), ("bk-sdm-small", 0.49, 0.66), ("bk-sdm-tiny", 0.33, 0.50), ("sd-v1.4", 0.86, 1.04),
])
def test_published_unet_and_whole_pipeline_sizes(name, unet, whole):
    c = registry_cost(name)
    assert _card(c.unet_params) == unet
    assert _card(c.pipeline_params) == whole
    # SD-v1's CLIP ViT-L/14 text tower and VAE decoder (BK-SDM's get_sdm_params: 123.1M, 49.5M)
    assert round(c.text_encoder_params / 1e5) == 1231 and round(c.vae_decoder_params / 1e5) == 495


def _hooked_unet_macs(cfg: dict, resolution: int):
    """The reference count: forward hooks on every nn.Conv2d / nn.Linear (output elements x input
    features x kernel area / groups) and on every attention layer (Q K^T + A V: 2 x L_q x L_k x
    inner_dim), one U-Net step on the meta device; nothing shared with the FlopCounterMode count."""
    import torch
    from diffusers.models.attention_processor import Attention
    from torch import nn

    from personalize.architectures import MacCount, build_unet

    unet = build_unet(cfg)
    counts = {"conv_linear": 0, "attention": 0}

    def on_layer(mod, _inputs, out):
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups) if isinstance(mod, nn.Conv2d) \
            else mod.in_features
        counts["conv_linear"] += out.numel() * k

    def on_attention(mod, args, kwargs):
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if hs.ndim == 4:  # spatial input (VAE-style attention): tokens = H*W
            hs = hs.flatten(2).transpose(1, 2)
        lk = (ctx if ctx is not None else hs).shape[1]
        counts["attention"] += 2 * hs.shape[0] * hs.shape[1] * lk * mod.inner_dim

    for m in unet.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(on_layer)
        elif isinstance(m, Attention):
            m.register_forward_pre_hook(on_attention, with_kwargs=True)
    c, side = unet.config, resolution // 8
    with torch.device("meta"), torch.no_grad():
        unet(torch.zeros(1, c.in_channels, side, side), torch.zeros(1), torch.zeros(1, 77, c.cross_attention_dim))
    return MacCount(**counts)


@pytest.mark.slow
def test_unet_macs_equal_an_independent_hooked_count():
    """Two independent counts (FlopCounterMode vs forward hooks on conv/linear/attention) agree;
    without attention it is the paper's conv+linear figure (BK-SDM-Small: 217.7G at 512 px)."""
    from personalize.architectures import ARCHS, SD_V1_UNET_CONFIG, student_config

    c = registry_cost("bk-sdm-small", 512)
    hooked = _hooked_unet_macs(student_config(SD_V1_UNET_CONFIG, ARCHS["bk-small"]), 512)
    assert c.unet_macs == hooked.total and c.unet_attention_macs == hooked.attention
    assert round((c.unet_macs - c.unet_attention_macs) / 1e8) == 2176
    assert registry_cost("bk-sdm-small", 256).unet_macs < c.unet_macs / 3


def test_local_pipeline_dir_counts_equal_its_loaded_modules(tiny_base):
    from personalize.sources import load_components

    c = pipeline_cost(tiny_base, 64)
    comps = load_components(tiny_base)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert c.unet_params == n(comps["unet"]) and c.text_encoder_params == n(comps["text_encoder"])
    assert c.vae_decoder_params == n(comps["vae"].decoder)
    assert c.pipeline_params == c.unet_params + c.text_encoder_params + c.vae_decoder_params
    assert c.unet_macs > 0 and c.vae_decoder_macs > 0 and c.text_encoder_macs > 0
    # MACs of a conv net grow with the pixel count: 4x the pixels, ~4x the decoder MACs
    assert pipeline_cost(tiny_base, 128).vae_decoder_macs == pytest.approx(4 * c.vae_decoder_macs, rel=0.02)


def test_unknown_architecture_has_no_registry_cost():
    assert registry_cost("small-sd-v0") is None and registry_cost("tiny") is None


@pytest.mark.slow
def test_backbones_cost_flag_prints_counts(cli):
    r = cli("backbones", "--cost")
    assert r.code == 0, r.err
    row = next(line for line in r.out.splitlines() if " bk-sdm-small " in line)
    assert "0.482B" in row and "0.655B" in row  # U-Net, whole pipeline
    assert "255.4G" in row  # MACs per U-Net step at 512 px, attention included
    assert "whole pipeline" not in cli("backbones").out
