"""End-to-end DreamBooth runs on the tiny backbone: files written, loadable by plain diffusers,
resume == uninterrupted, class-image cache reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, SHARED_DATASET

LORA_FILES = {"pytorch_lora_weights.safetensors", "run.json", "config.toml", "README.md", "validation.png", "logs"}
FULL_FILES = {"model_index.json", "unet", "text_encoder", "vae", "tokenizer", "scheduler",
              "run.json", "config.toml", "README.md", "validation.png", "logs"}


def _gen(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a sks dog", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images


@pytest.mark.smoke
@pytest.mark.parametrize("method,expected", [("lora", LORA_FILES), ("full", FULL_FILES)])
def test_run_writes_exactly_the_expected_files(method, expected, request):
    run = request.getfixturevalue(f"{method}_run")
    assert {p.name for p in run.iterdir()} == expected
    assert (run / "logs" / "loss.csv").is_file()
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "finished" and meta["method"] == method
    assert meta["base"]["source"] == "built-in" and Path(meta["base"]["path"]).is_dir()
    assert meta["config"]["steps"] == 4 and meta["resolution"] == 64
    assert meta["instance_prompt"] == "a sks dog" and meta["class_prompt"] == "a dog"
    header = (run / "logs" / "loss.csv").read_text().splitlines()[0].split(",")
    assert header == ["step", "loss", "loss_instance", "loss_prior"]
    card = (run / "README.md").read_text()
    assert card.startswith("---\n") and "a sks dog" in card


def test_validation_png_carries_prompt_and_seed(lora_run):
    from PIL import Image

    info = json.loads(Image.open(lora_run / "validation.png").text["personalize"])
    assert info["prompts"] == ["a sks dog"] and info["seeds"] == [0]


@pytest.mark.smoke
def test_lora_loads_in_plain_diffusers_and_changes_output(lora_run, tiny_base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    before = _gen(pipe)
    pipe.load_lora_weights(lora_run)
    after = _gen(pipe)
    assert abs(after - before).max() > 1e-4
    # both adapters came back, with the recipe's alpha != rank intact
    assert pipe.unet.peft_config and pipe.text_encoder.peft_config
    ucfg = next(iter(pipe.unet.peft_config.values()))
    tcfg = next(iter(pipe.text_encoder.peft_config.values()))
    assert (ucfg.r, ucfg.lora_alpha) == (16, 27) and (tcfg.r, tcfg.lora_alpha) == (16, 17)
    sd = load_file(lora_run / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in sd) and any(k.startswith("text_encoder.") for k in sd)
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if "lora_B" in k or "lora.up" in k)


def test_lora_fused_equals_unfused(lora_run, tiny_base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.load_lora_weights(lora_run)
    unfused = _gen(pipe)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert abs(_gen(pipe) - unfused).max() < 1e-4


@pytest.mark.smoke
def test_full_run_loads_with_from_pretrained(full_run, tiny_base):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    tuned = StableDiffusionPipeline.from_pretrained(full_run, safety_checker=None)
    assert abs(_gen(tuned) - _gen(base)).max() > 1e-4
    w_base = base.unet.state_dict()["conv_in.weight"]
    assert not torch.equal(tuned.unet.state_dict()["conv_in.weight"], w_base)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_equals_uninterrupted(method, photos, tmp_path, cli, monkeypatch):
    import personalize.checkpoints as train_mod

    args = [method, "--subject", photos, "--class-noun", "dog", "--lr", "1e-3", *FAST,
            "--steps", "6", "--checkpoint-every", "3", "--validation-images", "0"]
    assert cli(*args, "--output-dir", tmp_path / "a").code == 0

    real_save = train_mod.save_checkpoint

    def save_then_die(run_dir, step, *a, **k):
        real_save(run_dir, step, *a, **k)
        if step == 3:
            raise KeyboardInterrupt  # preempted right after the first checkpoint

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    r = cli(*args, "--output-dir", tmp_path / "b")
    assert r.code == 130 and "--resume" in r.err
    assert not (tmp_path / "b" / "run.json").exists()
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    # continuing without --resume is refused, with the hint
    r = cli(*args, "--output-dir", tmp_path / "b")
    assert r.code == 2 and "unfinished run (checkpoint at step 3)" in r.err
    assert cli(*args, "--output-dir", tmp_path / "b", "--resume").code == 0

    if method == "lora":
        a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
        b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    else:
        a = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = (tmp_path / "a" / "logs" / "loss.csv").read_text()
    lb = (tmp_path / "b" / "logs" / "loss.csv").read_text()
    assert la == lb  # the loss log of the resumed run has no duplicated or missing rows


@pytest.mark.slow
def test_class_image_cache_is_shared_by_subjects_of_a_class(dataset, tmp_path, cli, fresh_cache):
    common = ["--data-dir", dataset, *FAST, "--steps", "1", "--validation-images", "0",
              "--class-images", "3", "--resolution", "32"]
    assert cli("lora", "--subject", "dog", "--output-dir", tmp_path / "dog", *common).code == 0
    first = json.loads((tmp_path / "dog" / "run.json").read_text())["class_images"]
    assert first["generated_now"] == 3 and first["count"] == 3
    assert Path(first["dir"]).is_relative_to(fresh_cache)
    files = sorted(Path(first["dir"]).iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    assert cli("lora", "--subject", "dog2", "--output-dir", tmp_path / "dog2", *common).code == 0
    second = json.loads((tmp_path / "dog2" / "run.json").read_text())["class_images"]
    assert second["generated_now"] == 0 and second["dir"] == first["dir"]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # a larger request tops the cache up instead of starting over
    assert cli("lora", "--subject", "dog2", "--output-dir", tmp_path / "dog2b", *common[:-4],
               "--class-images", "4", "--resolution", "32").code == 0
    third = json.loads((tmp_path / "dog2b" / "run.json").read_text())["class_images"]
    assert third["generated_now"] == 1


def test_finished_run_is_refused_then_overwritten(lora_run, photos, cli):
    args = ["lora", "--subject", photos, "--class-noun", "dog", "--output-dir", lora_run, *FAST]
    r = cli(*args)
    assert r.code == 2 and "already holds a finished run" in r.err and "--overwrite" in r.err


@pytest.mark.slow
@pytest.mark.dataset
@pytest.mark.skipif(not SHARED_DATASET.is_dir(), reason="DreamBooth photos not in ../shared")
def test_real_subject_from_the_dreambooth_dataset(tmp_path, cli):
    r = cli("lora", "--subject", "dog", "--data-dir", SHARED_DATASET, *FAST, "--steps", "2",
            "--class-images", "0", "--output-dir", tmp_path / "dog")
    assert r.code == 0, r.err
    meta = json.loads((tmp_path / "dog" / "run.json").read_text())
    assert meta["subject"]["class_noun"] == "dog" and meta["subject"]["kind"] == "live"
    assert meta["class_images"] == {"enabled": False, "prior": "class-images"}
    assert (tmp_path / "dog" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_bf16_lora_on_cpu_keeps_fp32_adapter_and_loads(photos, tmp_path, cli, tiny_base):
    """bf16 autocast on CPU (the AMX lever): frozen base in bf16, LoRA weights saved in fp32."""
    from diffusers import StableDiffusionPipeline

    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", tmp_path / "r", *FAST,
            "--mixed-precision", "bf16", "--lr", "1e-2")
    assert r.code == 0, r.err
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["stats"]["mixed_precision"] == "bf16"
    sd = load_file(tmp_path / "r" / "pytorch_lora_weights.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.float32}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    before = _gen(pipe)
    pipe.load_lora_weights(tmp_path / "r")
    assert abs(_gen(pipe) - before).max() > 1e-4


def test_fp16_on_cpu_is_a_clear_error(photos, tmp_path, cli):
    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", tmp_path / "r", *FAST,
            "--mixed-precision", "fp16")
    assert r.code == 2 and "fp16 needs a GPU" in r.err


@pytest.mark.slow
@pytest.mark.parametrize("train_te,forwards", [(False, 2), (True, 4)])
def test_text_embeddings_are_cached_when_the_text_encoder_is_frozen(train_te, forwards, photos, tmp_path, cli,
                                                                     monkeypatch):
    """Frozen text encoder: 2 forwards in all (instance + class prompt, once); trained: one per step."""
    from transformers import CLIPTextModel

    calls = {"n": 0}
    real = CLIPTextModel.forward

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(CLIPTextModel, "forward", counting)
    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", tmp_path / "r", *FAST,
            "--class-images", "0", "--validation-images", "0",
            "--train-text-encoder" if train_te else "--no-train-text-encoder")
    assert r.code == 0, r.err
    assert calls["n"] == forwards
    sd = load_file(tmp_path / "r" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in sd) == train_te


@pytest.mark.slow
def test_run_killed_while_writing_outputs_resumes(photos, tmp_path, cli, monkeypatch):
    """Killed after the adapter was written but before the run finished: --resume takes the files
    it left as its own, trains no further, and still reports the losses it ended with."""
    import personalize.dreambooth as db

    args = ["lora", "--subject", photos, "--class-noun", "dog", *FAST, "--steps", "2", "--class-images", "0",
            "--output-dir", tmp_path / "r"]

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(db, "write_validation", die)
    assert cli(*args).code == 130
    assert (tmp_path / "r" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "r" / "run.json").exists()
    monkeypatch.undo()
    r = cli(*args, "--resume")
    assert r.code == 0, r.err
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["status"] == "finished" and set(meta["stats"]["final_losses"]) == {"loss", "loss_instance"}
    assert (tmp_path / "r" / "validation.png").is_file()
