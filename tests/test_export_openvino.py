"""`personalize export --format openvino` (fp32, fp16, int8) and `personalize generate` on it.

fp32 and fp16 weights run in f32 (INFERENCE_PRECISION_HINT), so images match the torch pipeline's
within 2/255 per pixel (other kernels' summation order, then uint8 rounding; fp16 storage rounds
weights to 11 bits, which a 3-step tiny model carries through to about a level). int8 rounds every
weight to 1/255 of its channel's range: its images stay close (mean difference under 3 levels)
but not pixel-equal."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from _export_helpers import files, pixels

pytest.importorskip("openvino")

TOL = 2
FILES = {"README.md", "export.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
         "tokenizer/tokenizer_config.json", *(f"{m}/{f}" for m in ("text_encoder", "unet", "vae_decoder")
                                              for f in ("config.json", "openvino_model.xml", "openvino_model.bin"))}
GEN = ["--prompt", "a {token} {class} in the snow", "--steps", "3", "-n", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def torch_images(lora_run, tmp_path_factory):
    from personalize.cli import main

    out = tmp_path_factory.mktemp("ov-torch")
    assert main(["generate", str(lora_run), *GEN, "-o", str(out)]) == 0
    return pixels(out)


@pytest.mark.parametrize("wf", ["fp32", pytest.param("int8", marks=pytest.mark.slow)])
def test_lora_export_and_generate(wf, lora_run, torch_images, tmp_path, cli):
    import openvino as ov

    out = tmp_path / wf
    r = cli("export", lora_run, "--format", "openvino", "--weight-format", wf, "-o", out)
    assert r.code == 0, r.err
    assert files(out) == FILES
    unet = ov.Core().read_model(str(out / "unet" / "openvino_model.xml"))
    assert [i.get_any_name() for i in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.get_any_name() for o in unet.outputs] == ["out_sample"]
    types = {op.get_output_element_type(0).get_type_name() for op in unet.get_ops() if op.get_type_name() == "Constant"}
    assert ("u8" in types or "i8" in types) == (wf == "int8")  # NNCF stores int8 weights + scales
    rec = json.loads((out / "export.json").read_text())
    assert rec["weight_format"] == wf and rec["fused"]["lora_scale"] == 1.0
    r = cli("generate", out, *GEN, "-o", tmp_path / "g")
    assert r.code == 0, r.err
    got = pixels(tmp_path / "g")
    assert got.keys() == torch_images.keys()
    for k, want in torch_images.items():
        diff = np.abs(got[k] - want)
        assert diff.max() <= TOL if wf == "fp32" else diff.mean() < 3.0, (wf, diff.max(), diff.mean())


@pytest.mark.slow
def test_full_run_fp16_is_half_the_size(full_run, tmp_path, cli):
    sizes = {}
    for wf in ("fp32", "fp16"):
        assert cli("export", full_run, "--format", "openvino", "--weight-format", wf, "-o", tmp_path / wf).code == 0
        assert files(tmp_path / wf) == FILES
        sizes[wf] = (tmp_path / wf / "unet" / "openvino_model.bin").stat().st_size
    assert 0.45 < sizes["fp16"] / sizes["fp32"] < 0.55
    assert json.loads((tmp_path / "fp16" / "export.json").read_text())["method"] == "full"


@pytest.mark.parametrize("case", ["missing", "not_a_run", "occupied", "no_extra", "no_nncf", "bad_weight_format"])
def test_errors_are_one_line(case, tmp_path, cli, lora_run, monkeypatch):
    src, out, extra = lora_run, tmp_path / "out", []
    if case == "missing":
        src = tmp_path / "nope"
    elif case == "not_a_run":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "occupied":
        out.mkdir()
    elif case == "no_extra":
        monkeypatch.setitem(sys.modules, "openvino", None)
    elif case == "no_nncf":
        monkeypatch.setitem(sys.modules, "nncf", None)
        extra = ["--weight-format", "int8"]
    r = cli("export", src, "--format", "onnx" if case == "bad_weight_format" else "openvino", "-o", out,
            *(["--weight-format", "int8"] if case == "bad_weight_format" else extra))
    assert r.code == 2
    assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, r.err
    if case in ("no_extra", "no_nncf"):
        assert "personalize[openvino]" in r.err
    assert (out.exists() and not any(out.iterdir())) if case == "occupied" else not out.exists()
