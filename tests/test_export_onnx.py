"""`personalize export --format onnx` and `personalize generate` on the export (onnxruntime, CPU).

Images are compared with the torch pipeline's for the same prompt, seed, scheduler and steps: the
diffusers loop is the same code, only the three models run on onnxruntime, whose fp32 kernels sum
in another order (~1e-6 relative per model call). After a few steps and the uint8 rounding of the
PNG that is at most a level or two per pixel, so the tolerance is 2/255 per pixel."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from _export_helpers import files, pixels

pytest.importorskip("onnxruntime")

TOL = 2  # uint8 levels; see the module docstring
FILES = {"README.md", "export.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
         "tokenizer/tokenizer_config.json", *(f"{m}/{f}" for m in ("text_encoder", "unet", "vae_decoder")
                                              for f in ("config.json", "model.onnx"))}
GEN = ["--prompt", "a {token} {class} on the beach", "--steps", "3", "-n", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def onnx_lora(lora_run, tmp_path_factory):
    from personalize.cli import main

    out = tmp_path_factory.mktemp("onnx") / "lora"
    assert main(["export", str(lora_run), "--format", "onnx", "-o", str(out)]) == 0
    return out


def test_lora_export_files_and_names(onnx_lora, lora_run):
    import onnxruntime as ort

    assert files(onnx_lora) == FILES
    names = {}
    for m in ("text_encoder", "unet", "vae_decoder"):
        s = ort.InferenceSession(str(onnx_lora / m / "model.onnx"), providers=["CPUExecutionProvider"])
        names[m] = ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()])
    assert names == {"text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
                     "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
                     "vae_decoder": (["latent_sample"], ["sample"])}
    rec = json.loads((onnx_lora / "export.json").read_text())
    assert rec["method"] == "lora" and rec["fused"]["adapter"] == str(lora_run.resolve())
    assert rec["sizes"]["total"] == sum(p.stat().st_size for p in onnx_lora.rglob("*") if p.is_file()
                                        and p.name not in ("export.json", "README.md"))
    readme = (onnx_lora / "README.md").read_text()
    assert "onnxruntime" in readme and "fused" in readme


def test_generate_matches_torch_and_keeps_the_lora(onnx_lora, lora_run, tmp_path, cli):
    r = cli("generate", onnx_lora, *GEN, "-o", tmp_path / "onnx")
    assert r.code == 0, r.err
    assert cli("generate", lora_run, *GEN, "-o", tmp_path / "torch").code == 0
    assert cli("generate", lora_run, *GEN, "--lora-scale", "0", "-o", tmp_path / "base").code == 0
    got, want, base = pixels(tmp_path / "onnx"), pixels(tmp_path / "torch"), pixels(tmp_path / "base")
    assert got.keys() == want.keys() and len(got) == 2
    for k in got:
        assert np.abs(got[k] - want[k]).max() <= TOL, k
        # the fused adapter shows: far nearer the LoRA run's image than the bare base's
        assert np.abs(got[k] - base[k]).mean() > 1.0 > 100 * np.abs(got[k] - want[k]).mean()
    side = json.loads((tmp_path / "onnx" / "p00-s5.json").read_text())["settings"]
    assert side["export"]["format"] == "onnx" and "sks" in side["prompt"]  # the run's token filled in
    again = cli("generate", onnx_lora, *GEN, "-o", tmp_path / "onnx")
    assert again.code == 0 and "already there" in again.out  # reuse rules as for runs


def test_full_run_export(full_run, tmp_path, cli):
    out = tmp_path / "full"
    assert cli("export", full_run, "--format", "onnx", "-o", out).code == 0
    assert files(out) == FILES
    rec = json.loads((out / "export.json").read_text())
    assert rec["method"] == "full" and "fused" not in rec
    assert cli("generate", out, *GEN[:4], "-n", "1", "-o", tmp_path / "g").code == 0
    assert cli("generate", full_run, *GEN[:4], "-n", "1", "-o", tmp_path / "t").code == 0
    a, b = pixels(tmp_path / "g"), pixels(tmp_path / "t")
    assert a.keys() == b.keys() and len(a) == 1
    assert all(np.abs(a[k] - b[k]).max() <= TOL for k in a)


def test_mid_block_free_pipeline_exports(tmp_path, cli, tiny_base):
    """BK-SDM-Small/Tiny drop the U-Net's mid block: a pipeline dir without one converts too."""
    from diffusers import UNet2DConditionModel

    base = tmp_path / "nomid"
    shutil.copytree(tiny_base, base)
    cfg = json.loads((tiny_base / "unet" / "config.json").read_text())
    cfg["mid_block_type"] = None
    unet = UNet2DConditionModel.from_config(cfg)
    assert unet.mid_block is None
    shutil.rmtree(base / "unet")
    unet.save_pretrained(base / "unet")
    r = cli("export", base, "--format", "onnx", "-o", tmp_path / "out")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "out" / "export.json").read_text())["method"] == "pipeline"


@pytest.mark.parametrize("case", ["missing", "not_a_run", "occupied", "no_extra", "adapter_on_export"])
def test_errors_are_one_line(case, tmp_path, cli, lora_run, onnx_lora, monkeypatch):
    src, out = lora_run, tmp_path / "out"
    if case == "missing":
        src = tmp_path / "nope"
    elif case == "not_a_run":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "occupied":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "no_extra":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    if case == "adapter_on_export":
        r = cli("generate", onnx_lora, "--adapter", lora_run, "--prompt", "x", "-o", out)
    else:
        r = cli("export", src, "--format", "onnx", "-o", out)
    assert r.code == 2
    assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, r.err
    if case == "no_extra":
        assert "personalize[onnx]" in r.err
    if case == "occupied":
        assert files(out) == {"mine.txt"}
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left
