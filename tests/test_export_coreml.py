"""`personalize export --format coreml`: Apple ml-stable-diffusion's packages, checked with
coremltools' own reader (prediction needs macOS, so the checks are on the specs and weights):
- each package's inputs/outputs have the names, shapes and dtypes Apple's Swift/Python pipelines use;
- palettized weights, de-palettized by coremltools (`decompress_weights`: LUT applied to the
  indices), take at most 2^nbits values, each the palette entry nearest the fp16 original (the
  k-means assignment) and within a few percent RMS of it;
- the palettized U-Net is the size nbits/16 of the fp16 one predicts for the weights coremltools
  palettizes (those over 2048 elements; smaller ones stay fp16), within 5%;
- a U-Net without a mid block (BK-SDM-Small/Tiny) converts."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

pytestmark = pytest.mark.slow  # each conversion takes 20-60 s on two cores

F16, F32 = 65552, 65568  # ArrayFeatureType.FLOAT16 / FLOAT32
TOP = {"README.md", "export.json", "vocab.json", "merges.txt", "TextEncoder.mlpackage", "Unet.mlpackage",
       "VAEDecoder.mlpackage"}
THRESHOLD = 2048  # OpPalettizerConfig.weight_threshold's default: only larger weights are palettized


def top(root):
    return {p.name for p in root.iterdir()}


def spec(path):
    d = ct.models.MLModel(str(path), skip_model_load=True).get_spec().description
    return ({i.name: (list(i.type.multiArrayType.shape), i.type.multiArrayType.dataType) for i in d.input},
            {o.name: o.type.multiArrayType.dataType for o in d.output})


def weights(path, threshold=0):
    """name -> float weight (coremltools names a de-palettized weight NAME_palettized)."""
    model = ct.models.MLModel(str(path), skip_model_load=True)
    if "palettized" in json.dumps(list(ct.optimize.coreml.get_weights_metadata(model, THRESHOLD))):
        model = ct.optimize.coreml.decompress_weights(model)
    meta = ct.optimize.coreml.get_weights_metadata(model, threshold)
    return {k.removesuffix("_palettized"): m.val.astype(np.float32) for k, m in meta.items()
            if np.issubdtype(m.val.dtype, np.floating)}


def weight_bytes(path):
    return (path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


@pytest.fixture(scope="module")
def exports(lora_run, tmp_path_factory):
    from personalize.cli import main

    root = tmp_path_factory.mktemp("coreml")
    for name, extra in (("q6", []), ("fp16", ["--quantize-nbits", "none"])):
        assert main(["export", str(lora_run), "--format", "coreml", "-o", str(root / name), *extra]) == 0
    return root


def test_packages_have_apples_contract(exports, tiny_base):
    unet_cfg = json.loads((tiny_base / "unet" / "config.json").read_text())
    d, lat = unet_cfg["cross_attention_dim"], unet_cfg["sample_size"]
    for name in ("q6", "fp16"):
        out = exports / name
        assert top(out) == TOP
        assert spec(out / "TextEncoder.mlpackage") == ({"input_ids": ([1, 77], F32)},
                                                       {"last_hidden_state": F32, "pooled_outputs": F32})
        assert spec(out / "Unet.mlpackage") == (
            {"sample": ([2, 4, lat, lat], F16), "timestep": ([2], F16), "encoder_hidden_states": ([2, d, 1, 77], F16)},
            {"noise_pred": F32})
        assert spec(out / "VAEDecoder.mlpackage") == ({"z": ([1, 4, lat, lat], F16)}, {"image": F32})
        vocab = json.loads((out / "vocab.json").read_text())
        assert vocab["<|endoftext|>"] == len(vocab) - 1 and (out / "merges.txt").read_text().startswith("#version")
    rec = json.loads((exports / "q6" / "export.json").read_text())
    assert rec["quantize_nbits"] == 6 and rec["method"] == "lora" and "fused" in rec
    assert json.loads((exports / "fp16" / "export.json").read_text())["quantize_nbits"] is None
    assert "StableDiffusionPipeline(resourcesAt" in (exports / "q6" / "README.md").read_text()


def test_generate_on_a_coreml_export_says_where_it_runs(exports, cli, tmp_path):
    r = cli("generate", exports / "q6", "--prompt", "x", "-o", tmp_path / "g")
    assert r.code == 2 and "macOS" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists()


def test_palettized_weights_are_kmeans_of_the_fp16_ones(exports):
    nbits = 6
    # threshold 0 (every weight) trips coremltools 9 on a list-valued constant of the text encoder
    for package, least in (("Unet.mlpackage", 0), ("TextEncoder.mlpackage", THRESHOLD)):
        orig, dense = weights(exports / "fp16" / package, least), weights(exports / "q6" / package, least)
        assert orig.keys() == dense.keys()
        checked = 0
        for k, w, q in ((k, orig[k], dense[k]) for k in orig):
            assert w.shape == q.shape
            if w.size <= THRESHOLD or "token_embedding" in k:
                assert np.array_equal(w, q)  # left in fp16: small, or the embedding table (gather ops excluded)
                continue
            lut = np.unique(q)
            assert len(lut) <= 2**nbits
            nearest = np.abs(w.reshape(-1, 1) - lut.reshape(1, -1)).min(axis=1)
            err = np.abs(w - q).reshape(-1)
            assert (err - nearest).max() <= 1e-3 * (w.max() - w.min())  # each weight -> its nearest centroid
            assert np.sqrt((err**2).mean()) < 0.05 * w.std()
            checked += 1
        assert checked > 0


def test_palettized_size_is_nbits_over_16(exports):
    nbits = 6
    orig = weights(exports / "fp16" / "Unet.mlpackage")
    predicted = sum(w.size * 2 if w.size <= THRESHOLD else w.size * nbits / 8 + 2**nbits * 2 for w in orig.values())
    fp16 = weight_bytes(exports / "fp16" / "Unet.mlpackage")
    assert abs(sum(w.size * 2 for w in orig.values()) / fp16 - 1) < 0.05  # the fp16 file is its weights
    assert abs(weight_bytes(exports / "q6" / "Unet.mlpackage") / predicted - 1) < 0.05


def test_mid_block_free_unet_converts_with_the_vae_encoder(tmp_path, tiny_base, cli):
    from diffusers import UNet2DConditionModel

    base = tmp_path / "nomid"
    shutil.copytree(tiny_base, base)
    cfg = json.loads((tiny_base / "unet" / "config.json").read_text())
    cfg["mid_block_type"] = None
    shutil.rmtree(base / "unet")
    UNet2DConditionModel.from_config(cfg).save_pretrained(base / "unet")
    r = cli("export", base, "--format", "coreml", "--quantize-nbits", "none", "--vae-encoder", "-o", tmp_path / "out")
    assert r.code == 0, r.err
    assert top(tmp_path / "out") == TOP | {"VAEEncoder.mlpackage"}
    assert "noise_pred" in spec(tmp_path / "out" / "Unet.mlpackage")[1]
    lat = cfg["sample_size"]
    assert spec(tmp_path / "out" / "VAEEncoder.mlpackage") == ({"x": ([1, 3, 8 * lat, 8 * lat], F16)}, {"latent": F32})


@pytest.mark.parametrize("case", ["bundle_off_mac", "no_extra", "bad_nbits", "occupied", "not_a_run"])
def test_errors_are_one_line(case, tmp_path, cli, lora_run, monkeypatch):
    src, out, extra = lora_run, tmp_path / "out", []
    if case == "bundle_off_mac":
        monkeypatch.setattr(sys, "platform", "linux")
        extra = ["--bundle-resources"]
    elif case == "no_extra":
        monkeypatch.setitem(sys.modules, "coremltools", None)
    elif case == "bad_nbits":
        extra = ["--quantize-nbits", "5"]
    elif case == "occupied":
        out.mkdir()
    elif case == "not_a_run":
        src = tmp_path / "empty"
        src.mkdir()
    r = cli("export", src, "--format", "coreml", "-o", out, *extra)
    assert r.code == 2
    assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, r.err
    assert {"bundle_off_mac": "needs a Mac", "no_extra": "personalize[coreml]", "bad_nbits": "--quantize-nbits",
            "occupied": "already exists", "not_a_run": "not a run"}[case] in r.err
    assert (out.exists() and not any(out.iterdir())) if case == "occupied" else not out.exists()


def test_split_einsum_attention_is_the_same_function(tiny_base):
    """Apple's SPLIT_EINSUM attention: per-head einsums give the U-Net's own output."""
    import torch
    from diffusers import UNet2DConditionModel

    from personalize.export.deploy.coreml import SplitEinsumAttnProcessor

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 10.0]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        want = unet(x, t, text).sample
        unet.set_attn_processor(SplitEinsumAttnProcessor())
        got = unet(x, t, text).sample
    assert torch.allclose(got, want, atol=1e-5)
