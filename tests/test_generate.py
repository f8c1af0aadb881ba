"""`personalize generate` and `personalize export` on the tiny backbone: determinism and reuse,
metadata round trip, LoRA scale and adapter mixing, kohya export read back by diffusers' own
loader, merged export == unfused adapter, and the one-line errors (a LoRA on a base it does not fit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personalize.runtimes import read_export

GEN = ["--steps", "2", "--seed", "3"]


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("p*.png"))}


def one(folder: Path) -> np.ndarray:
    (arr,) = pixels(folder).values()
    return arr


@pytest.fixture(scope="module")
def snow(lora_run, tmp_path_factory, request):
    """One generate call: two prompts x two images, reused by several tests."""
    from personalize.cli import main

    out = tmp_path_factory.mktemp("gen") / "snow"
    assert main(["generate", str(lora_run), "--prompt", "a {token} {class} in the snow", "--prompt", "a {class}",
                 "-n", "2", *GEN, "-o", str(out)]) == 0
    return out


@pytest.mark.smoke
def test_generate_writes_images_sidecars_grid_and_index(snow, lora_run):
    names = {p.name for p in snow.iterdir()}
    assert names == {"p00-s3.png", "p00-s4.png", "p01-s3.png", "p01-s4.png", "p00-s3.json", "p00-s4.json",
                     "p01-s3.json", "p01-s4.json", "grid.png", "images.json"}
    index = json.loads((snow / "images.json").read_text())
    assert [(r["prompt"], r["seed"]) for r in index["images"]] == [
        ("a sks dog in the snow", 3), ("a sks dog in the snow", 4), ("a dog", 3), ("a dog", 4)]
    with Image.open(snow / "grid.png") as g:
        assert g.size == (2 * 64, 2 * 64)  # one row per prompt, one column per seed


def test_png_metadata_round_trips_and_matches_the_sidecar(snow, lora_run):
    with Image.open(snow / "p00-s4.png") as im:
        meta = json.loads(im.text["personalize"])
        assert im.text["prompt"] == "a sks dog in the snow" and im.text["seed"] == "4"
    side = json.loads((snow / "p00-s4.json").read_text())
    assert meta == side["settings"]
    assert meta["scheduler"] == "dpm++" and meta["steps"] == 2 and meta["guidance_scale"] == 7.5
    assert meta["negative_prompt"] is None and meta["resolution"] == 64 and meta["base"] == "tiny"
    (adapter,) = meta["adapters"]
    assert adapter["run"] == str(lora_run.resolve()) and adapter["weight"] == 1.0 and meta["lora_scale"] == 1.0


def test_identical_flags_give_identical_images_and_reuse_them(snow, lora_run, tmp_path, cli):
    r = cli("generate", lora_run, "--prompt", "a {token} {class} in the snow", "--prompt", "a {class}", "-n", "2",
            *GEN, "-o", tmp_path / "again")
    assert r.code == 0, r.err
    first, again = pixels(snow), pixels(tmp_path / "again")
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["p00-s3.png"], first["p00-s4.png"])  # each image has its own seed

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "again").glob("p*.png")}
    r = cli("generate", lora_run, "--prompt", "a {token} {class} in the snow", "--prompt", "a {class}", "-n", "2",
            *GEN, "-o", tmp_path / "again")
    assert r.code == 0 and "4 already there" in r.out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a changed setting is not reused
    r = cli("generate", lora_run, "--prompt", "a {class}", *GEN, "--guidance-scale", "3", "-o", tmp_path / "again")
    assert r.code == 0 and "already there" not in r.out


def test_a_dtype_other_than_the_default_is_a_setting_of_its_own(snow, lora_run, tmp_path, cli):
    """bf16 pixels are not fp32's: images drawn with --dtype bf16 never pass for the default's (or the
    reverse), and the default's settings are those images always had (no dtype key: still reused)."""
    out = tmp_path / "d"
    shutil.copytree(snow, out)
    args = ["generate", lora_run, "--prompt", "a {token} {class} in the snow", "--prompt", "a {class}", "-n", "2",
            *GEN, "-o", out]
    r = cli(*args, "--dtype", "auto")
    assert r.code == 0 and "4 already there" in r.out  # auto on CPU is fp32: what the folder holds
    r = cli(*args, "--dtype", "bf16")
    assert r.code == 0 and "already there" not in r.out
    side = json.loads((out / "p00-s3.json").read_text())["settings"]
    assert side["dtype"] == "bf16" and "dtype" not in json.loads((snow / "p00-s3.json").read_text())["settings"]
    assert not np.array_equal(pixels(out)["p00-s3.png"], pixels(snow)["p00-s3.png"])
    assert "4 already there" in cli(*args, "--dtype", "bf16").out
    assert "already there" not in cli(*args).out  # back to the default: drawn again


def test_lora_scale_zero_is_the_base_and_scale_changes_the_image(lora_run, tiny_base, tmp_path, cli):
    def gen(name, *flags):
        assert cli("generate", *flags, "--prompt", "a sks dog", *GEN, "-o", tmp_path / name).code == 0
        return one(tmp_path / name)

    base = gen("base", "--base", str(tiny_base))
    assert np.array_equal(gen("zero", lora_run, "--lora-scale", "0"), base)
    full, half = gen("one", lora_run), gen("half", lora_run, "--lora-scale", "0.5")
    assert np.abs(full - base).max() > 0 and np.abs(half - full).max() > 0 and np.abs(half - base).max() > 0


def test_adapter_weights_mix_adapters(lora_run, lora_run_object, tmp_path, cli):
    def gen(name, *flags):
        r = cli("generate", "--adapter", lora_run, "--adapter", lora_run_object, *flags, "--prompt", "a {token} dog",
                *GEN, "-o", tmp_path / name)
        assert r.code == 0, r.err
        return one(tmp_path / name)

    only_a = gen("a", "--adapter-weights", "1,0")
    assert cli("generate", lora_run, "--prompt", "a {token} dog", *GEN, "-o", tmp_path / "single").code == 0
    np.testing.assert_allclose(only_a, one(tmp_path / "single"), atol=1)
    mixed = gen("mixed", "--adapter-weights", "0.7,0.5")
    assert np.abs(mixed - only_a).max() > 0 and np.abs(mixed - gen("a07", "--adapter-weights", "0.7,0")).max() > 0
    meta = json.loads((tmp_path / "mixed" / "p00-s3.json").read_text())["settings"]
    assert [a["weight"] for a in meta["adapters"]] == [0.7, 0.5]
    assert meta["prompt"] == "a sks dog"  # {token} comes from the first adapter's run


def test_full_run_generates_from_its_own_pipeline(full_run, tiny_base, tmp_path, cli):
    assert cli("generate", full_run, "--prompt", "a {token} {class}", *GEN, "-o", tmp_path / "full").code == 0
    assert cli("generate", "--base", tiny_base, "--prompt", "a sks dog", *GEN, "-o", tmp_path / "base").code == 0
    assert np.abs(one(tmp_path / "full") - one(tmp_path / "base")).max() > 0
    meta = json.loads((tmp_path / "full" / "p00-s3.json").read_text())["settings"]
    assert meta["full_run"]["subject"] == "my_dog" and "adapters" not in meta


def _diffusers_images(pipe, seed=0):
    import torch

    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return pipe(["a sks dog", "a dog on the beach"], num_inference_steps=3, height=64, width=64,
                generator=g, output_type="np").images


@pytest.mark.smoke
def test_kohya_export_round_trips_through_diffusers(lora_run, tiny_base, tmp_path, cli):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    out = tmp_path / "dog_kohya.safetensors"
    r = cli("export", lora_run, "--format", "kohya", "-o", out)
    assert r.code == 0, r.err
    with safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {k: float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert {v for k, v in alphas.items() if k.startswith("lora_unet_")} == {27.0}
    assert {v for k, v in alphas.items() if k.startswith("lora_te_")} == {17.0}
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "27"

    ours = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    ours.load_lora_weights(lora_run)
    kohya = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    kohya.load_lora_weights(str(out))  # diffusers' own kohya conversion
    base = _diffusers_images(StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None))
    a, b = _diffusers_images(ours), _diffusers_images(kohya)
    assert np.abs(a - base).max() > 1e-3
    np.testing.assert_allclose(b, a, atol=1e-5)

    r = cli("export", lora_run, "--format", "kohya", "-o", out)
    assert r.code == 2 and "--overwrite" in r.err and "\n" not in r.err.strip()


@pytest.mark.smoke
def test_merged_export_equals_the_unfused_adapter(lora_run, tmp_path, cli):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged"
    assert cli("export", lora_run, "--format", "merged", "-o", out, "--lora-scale", "0.5").code == 0
    assert {"model_index.json", "unet", "text_encoder", "vae", "tokenizer", "scheduler"} <= {p.name for p in out.iterdir()}
    assert not list(out.rglob("*.bin")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    merged = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert not getattr(merged.unet, "peft_config", None)  # plain weights, no PEFT layers
    # one export.json schema: its format first, as every deploy export writes it
    rec = read_export(out)
    assert rec is not None and rec["format"] == "merged" and rec["from"] == str(lora_run.resolve())
    assert cli("generate", lora_run, "--prompt", "a sks dog", *GEN, "--lora-scale", "0.5",
               "-o", tmp_path / "unfused").code == 0
    assert cli("generate", "--base", out, "--prompt", "a sks dog", *GEN, "-o", tmp_path / "fused").code == 0
    np.testing.assert_allclose(one(tmp_path / "fused"), one(tmp_path / "unfused"), atol=1)


@pytest.fixture(scope="module")
def other_arch_base(tiny_base, tmp_path_factory) -> Path:
    """`tiny` pruned to the bk-tiny architecture: a base the tiny LoRA cannot fit (as bk-sdm-tiny vs -base)."""
    from distill.cli import main

    out = tmp_path_factory.mktemp("bases") / "tiny-bk-tiny"
    assert main(["prune", "--teacher", str(tiny_base), "--arch", "bk-tiny", "-o", str(out)]) == 0
    return out


def test_adapter_on_a_base_it_does_not_fit_is_one_line(lora_run, other_arch_base, tmp_path, cli):
    for cmd in (["generate", lora_run, "--prompt", "x", *GEN, "-o", tmp_path / "g"],
                ["export", lora_run, "--format", "merged", "-o", tmp_path / "m"]):
        r = cli(*cmd, "--base", other_arch_base)
        err = r.err.strip()
        assert r.code == 2 and "\n" not in err and "Traceback" not in err
        assert "trained on tiny" in err and f"does not fit {other_arch_base}" in err
    assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("args,message", [
    (["--adapter", "{full}"], "is a whole pipeline, not an adapter"),
    (["{lora}", "--adapter-weights", "0.5,0.5"], "2 values for 1 adapter"),
    (["--base", "tiny", "--prompt", "a {token} dog"], "no run to fill it"),
    (["{lora}", "--dtype", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
    (["{lora}", "--steps", "0"], "--steps: 0 must be >= 1"),
    (["{lora}", "--resolution", "60"], "multiple of 8"),
    (["{lora}", "--guidance-scale", "inf"], "--guidance-scale: inf is not a finite number"),
    (["{lora}", "--guidance-scale", "nan"], "--guidance-scale: nan is not a finite number"),
    (["{lora}", "--lora-scale", "nan"], "--lora-scale: nan is not a finite number"),
    (["{lora}", "--batch-size", "0"], "--batch-size: 0 must be >= 1"),
    (["{lora}", "--batch-size", "-1"], "--batch-size: -1 must be >= 1"),
    (["{lora}", "--resolution", "0"], "--resolution: 0 must be >= 8"),
    (["{lora}", "-n", "0"], "--images-per-prompt: 0 must be >= 1"),
    (["{lora}", "--adapter-weights", "nan"], "nan is not a finite number"),
    (["{lora}", "--device", "cuda:7"], "--device cuda:7: this machine has 0 CUDA device"),
    (["{lora}", "--device", "potato"], "--device potato: not a device name"),
    (["{lora}", "--prompts", "/nonexistent/prompts.txt"], "unreadable"),
    (["{lora}", "--prompts", "/dev/zero"], "not a regular file"),
    (["{lora}", "--prompts", "/tmp"], "not a regular file"),
    (["/nonexistent/run"], "no run.json"),
    ([], "nothing to generate with"),
])
def test_generate_bad_input_is_one_line(args, message, lora_run, full_run, tmp_path, cli):
    args = [a.format(lora=lora_run, full=full_run) if "{" in a and "token" not in a else a for a in args]
    r = cli("generate", *args, "-o", tmp_path / "out")
    assert r.code == 2 and message in r.err and "\n" not in r.err.strip()
    assert not (tmp_path / "out").exists()


def test_unfinished_run_is_refused(lora_run, tmp_path, cli):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "status": "running"}))
    for cmd in (["generate", run], ["export", run, "--format", "kohya", "-o", tmp_path / "k.safetensors"]):
        r = cli(*cmd)
        assert r.code == 2 and "has not finished" in r.err and "--resume" in r.err


def test_prompt_sources(lora_run, lora_run_object, tmp_path):
    from personalize.generate import collect_prompts
    from personalize.sources import resolve_source
    from personalize.subjects import load_prompts

    src = resolve_source(lora_run)
    assert collect_prompts(src) == ["a sks dog"]  # nothing given: the run's instance prompt
    assert collect_prompts(src, protocol=True) == load_prompts("live") and len(load_prompts("live")) == 25
    obj = resolve_source(lora_run_object)
    assert collect_prompts(obj, protocol=True) == load_prompts("object") != load_prompts("live")
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\na {token} {class} at night\n\n  a {class} in a box  \n")
    assert collect_prompts(src, ["first"], f) == ["first", "a {token} {class} at night", "a {class} in a box"]
    assert [obj.fill(t) for t in collect_prompts(obj, prompts_file=f)] == ["a zwx backpack at night",
                                                                             "a backpack in a box"]


def _settings(folder: Path) -> dict:
    return {p.name: json.loads(p.read_text())["settings"] for p in sorted(folder.glob("p*.json"))}


@pytest.mark.parametrize("base", ["tiny", "{tiny_base}"])
def test_a_base_as_run_dir_is_the_same_as_base(base, tiny_base, tmp_path, cli):
    """Before/after personalization: `generate tiny` (or a pipeline dir) draws what `--base tiny`
    draws, with the same seeds, settings and reuse."""
    base = base.format(tiny_base=tiny_base)
    a = cli("generate", base, "--prompt", "a photo of a dog", "-n", "2", *GEN, "-o", tmp_path / "run_dir")
    assert a.code == 0, a.err
    b = cli("generate", "--base", base, "--prompt", "a photo of a dog", "-n", "2", *GEN, "-o", tmp_path / "flag")
    assert b.code == 0, b.err
    got, want = pixels(tmp_path / "run_dir"), pixels(tmp_path / "flag")
    assert got.keys() == want.keys() and len(got) == 2
    assert all(np.array_equal(got[k], want[k]) for k in got)
    assert _settings(tmp_path / "run_dir") == _settings(tmp_path / "flag")
    again = cli("generate", base, "--prompt", "a photo of a dog", "-n", "2", *GEN, "-o", tmp_path / "flag")
    assert again.code == 0 and "already there" in again.out  # the same images, reused


def test_a_base_as_run_dir_takes_adapters_and_refuses_a_second_base(lora_run, tiny_base, tmp_path, cli):
    a = cli("generate", "tiny", "--adapter", lora_run, "--prompt", "a sks dog", *GEN, "-o", tmp_path / "a")
    b = cli("generate", "--base", "tiny", "--adapter", lora_run, "--prompt", "a sks dog", *GEN, "-o", tmp_path / "b")
    assert a.code == b.code == 0, a.err + b.err
    assert np.array_equal(one(tmp_path / "a"), one(tmp_path / "b"))
    r = cli("generate", "tiny", "--base", tiny_base, "--prompt", "x", "-o", tmp_path / "c")
    assert r.code == 2 and "--base" in r.err and "tiny" in r.err and "\n" not in r.err.strip()
    assert not (tmp_path / "c").exists()


def test_a_merged_export_is_a_run_dir_too(lora_run, tmp_path, cli):
    out = tmp_path / "merged"
    assert cli("export", lora_run, "--format", "merged", "-o", out).code == 0
    r = cli("generate", out, "--prompt", "a sks dog", *GEN, "-o", tmp_path / "g")
    assert r.code == 0, r.err
    assert cli("generate", "--base", out, "--prompt", "a sks dog", *GEN, "-o", tmp_path / "h").code == 0
    assert np.array_equal(one(tmp_path / "g"), one(tmp_path / "h"))


@pytest.mark.parametrize("arg,fragment", [("dgo", "no run.json"), ("nowhere/run", "no run.json"),
                                          ("{afile}", "no run.json")])
def test_what_is_neither_a_run_nor_a_base_is_one_line(arg, fragment, tmp_path, cli):
    (tmp_path / "afile").write_text("not a run")
    arg = arg.format(afile=tmp_path / "afile")
    r = cli("generate", arg, "--prompt", "x", "-o", tmp_path / "out")
    assert r.code == 2 and fragment in r.err and arg in r.err and "\n" not in r.err.strip(), r.err
    assert not (tmp_path / "out").exists()
