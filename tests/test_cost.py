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
    # (small-sd-v0 is counted now: test_small_sd_v0_is_counted_as_sd_v1_with_one_pair_per_stage)
    assert registry_cost("tiny") is None


@pytest.mark.slow
def test_backbones_cost_flag_prints_counts(cli):
    r = cli("backbones", "--cost")
    assert r.code == 0, r.err
    row = next(line for line in r.out.splitlines() if " bk-sdm-small " in line)
    assert "0.482B" in row and "0.655B" in row  # U-Net, whole pipeline
    assert "255.4G" in row  # MACs per U-Net step at 512 px, attention included
    assert "whole pipeline" not in cli("backbones").out


# ---------------------------------------------------------------- `backbones --cost DIR` (issue 25)
@pytest.fixture
def no_registry_counts(monkeypatch, tmp_path):
    """The registry rows' SD-size counts take seconds each (and `tiny`'s, when it is cached, one);
    these tests are about the DIR rows."""
    from personalize.commands import info

    monkeypatch.setattr(info, "registry_cost", lambda *a, **k: None)
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "empty-cache"))


def _row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if f" {name} " in line)


def test_backbones_cost_counts_pipeline_dirs_like_registry_rows(tiny_base, tmp_path, cli, no_registry_counts):
    import shutil

    from personalize.cost import fmt_macs, fmt_params

    c = pipeline_cost(tiny_base, 512)
    a, b = tmp_path / "pipe-a", tmp_path / "pipe-b"
    shutil.copytree(tiny_base, a)
    shutil.copytree(tiny_base, b)
    r = cli("backbones", "--cost", tiny_base, "--cost", f"{a},{b}")  # repeatable, and comma lists
    assert r.code == 0, r.err
    for d in (tiny_base, a, b):
        row = _row(r.out, str(d))
        assert f"{c.unet_params / 1e6:.1f}M" in row and "?" not in row
        assert fmt_params(c.pipeline_params) in row and fmt_macs(c.unet_macs) in row
    assert str(tiny_base) not in cli("backbones", "--cost").out  # plain --cost: the registry only


def test_backbones_cost_counts_a_distill_output(tiny_base, tmp_path, cli, no_registry_counts):
    """A `distill train` output (its pipeline is OUT/student) is counted as its student."""
    import shutil

    run = tmp_path / "kd-run"
    shutil.copytree(tiny_base, run / "student")
    r = cli("backbones", "--cost", run)
    assert r.code == 0, r.err
    assert f"{pipeline_cost(tiny_base, 512).unet_params / 1e6:.1f}M" in _row(r.out, str(run))


@pytest.mark.parametrize("kind, culprit", [
    ("missing", ""), ("a-file", ""), ("not-a-pipeline", ""), ("unet-config-not-json", "unet/config.json"),
    ("unet-config-a-list", "unet/config.json"), ("text-config-wrong-values", ""),
])
def test_backbones_cost_of_a_bad_dir_is_one_line_and_prints_no_table(kind, culprit, tiny_base, tmp_path, cli,
                                                                    no_registry_counts):
    import json
    import shutil

    d = tmp_path / "pipe"
    if kind == "a-file":
        d.write_text("x")
    elif kind == "not-a-pipeline":
        d.mkdir()
    elif kind != "missing":
        shutil.copytree(tiny_base, d)
        if kind == "unet-config-not-json":
            (d / "unet" / "config.json").write_text("{ nope")
        elif kind == "unet-config-a-list":
            (d / "unet" / "config.json").write_text("[1, 2]")
        else:
            cfg = json.loads((d / "text_encoder" / "config.json").read_text())
            (d / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "hidden_size": "wide"}))
    r = cli("backbones", "--cost", f"{tiny_base},{d}")
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.err, r.err
    assert str(d / culprit).rstrip("/") in lines[0] and r.out == ""


@pytest.mark.slow
def test_small_sd_v0_is_counted_as_sd_v1_with_one_pair_per_stage():
    """OFA-Sys/small-stable-diffusion-v0's model card: SD-v1.4 with layers_per_block=1, initialised
    from the first layer of each block; its unet/diffusion_pytorch_model.bin is 2.32 GB of fp32
    (~0.58B parameters). That is BK-SDM-Base's U-Net shape (mid block kept)."""
    c = registry_cost("small-sd-v0")
    assert c is not None and _card(c.unet_params) == 0.58 and c == registry_cost("bk-sdm-base")


@pytest.mark.slow
def test_backbones_cost_row_of_small_sd_v0_is_counted(cli, monkeypatch, tmp_path):
    from personalize.commands import info

    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(info, "registry_cost", lambda name, res=512: registry_cost(name, res)
                        if name == "small-sd-v0" else None)  # the other rows: test_backbones_cost_flag_prints_counts
    from personalize.cost import fmt_params

    c = registry_cost("small-sd-v0")
    row = _row(cli("backbones", "--cost").out, "small-sd-v0")
    assert "?" not in row and f"{c.unet_params / 1e6:.1f}M (counted)" in row and fmt_params(c.pipeline_params) in row
