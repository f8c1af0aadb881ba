"""`personalize export --format single-file` and `kohya --names ldm`, read back by independent
readers: diffusers' `from_single_file` (its own ldm -> diffusers converter, given the pipeline dir as
`config`, or building the pipeline from our A1111 `.yaml` alone), on the tiny base, a small
SD-v1-shaped pipeline (GroupNorm 32, as ldm builds) and its bk-base/small/tiny students made by
`distill prune`, a LoRA run (fused) and a full run. Also: every text encoder we save carries
transformers 4.x names (`text_model.`), and transformers 5 still loads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from personalize.export.ldm_layout import UNET_PREFIX


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd_shaped(tmp_path_factory) -> Path:
    """SD-v1's layout (2/3 blocks per stage, 3 attention stages, a mid block) at tiny widths, with
    ldm's 32-group norms, so that the ldm clients' own rules apply to it."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from personalize.backbones import build_tiny_components

    comps = build_tiny_components(1)
    torch.manual_seed(1)
    comps["unet"] = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), norm_num_groups=32,
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)
    comps["vae"] = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=32, sample_size=64)
    out = tmp_path_factory.mktemp("sd") / "sd-shaped"
    StableDiffusionPipeline(**comps, requires_safety_checker=False).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def students(sd_shaped, tmp_path_factory) -> dict[str, Path]:
    from distill.cli import main

    root = tmp_path_factory.mktemp("students")
    for arch in ("bk-base", "bk-small", "bk-tiny"):
        assert main(["prune", "--teacher", str(sd_shaped), "--arch", arch, "-o", str(root / arch)]) == 0
    return {a: root / a for a in ("bk-base", "bk-small", "bk-tiny")}


def _outputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = pipe.unet
    x = torch.randn(2, u.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, u.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (1, 77), generator=g)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        lat = pipe.vae.encode(img).latent_dist.mean
        return {"unet": u(x, torch.tensor([10, 500]), ctx).sample, "text_encoder": pipe.text_encoder(ids)[0],
                "vae": pipe.vae.decode(lat).sample}


def _reload(path: Path, config: Path, **kw):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(path), config=str(config), safety_checker=None, **kw)


def _assert_same(a: dict, b: dict, atol=1e-6):
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=0, msg=f"{k} differs")


# (A1111 verdict, .yaml written) per layout; ComfyUI detects SD only at model_channels 320, so on
# these widths it is "no" (the real SD-v1 shapes are checked on the meta device below)
EXPECTED = {"tiny": ("no: GroupNorm", False), "sd-shaped": ("yes", False), "bk-base": ("yes", True),
            "bk-small": ("no: its ldm UNetModel cannot be built without a mid block", False),
            "bk-tiny": ("no: its ldm UNetModel cannot be built without a mid block", False)}


@pytest.mark.parametrize("which", list(EXPECTED))
def test_single_file_reloads_in_diffusers_with_the_same_outputs(which, tiny_base, sd_shaped, students, tmp_path, cli):
    from diffusers import StableDiffusionPipeline

    src = {"tiny": tiny_base, "sd-shaped": sd_shaped, **students}[which]
    out = tmp_path / f"{which}.safetensors"
    r = cli("export", "tiny" if which == "tiny" else src, "--format", "single-file", "-o", out)
    assert r.code == 0, r.err
    a1111, has_yaml = EXPECTED[which]
    assert f"AUTOMATIC1111: {a1111}" in r.out
    assert out.with_suffix(".yaml").is_file() == has_yaml
    readme = (tmp_path / f"{which}.README.md").read_text()
    assert "AUTOMATIC1111" in readme and "ComfyUI" in readme and "from_single_file" in readme

    sd = load_file(str(out))
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.") for k in sd)
    unet_keys = {k for k in sd if k.startswith(UNET_PREFIX)}
    assert any(".middle_block." in k for k in unet_keys) == (which not in ("bk-small", "bk-tiny"))

    ref = StableDiffusionPipeline.from_pretrained(src, safety_checker=None)
    _assert_same(_outputs(ref), _outputs(_reload(out, src)))


def test_bk_base_yaml_alone_builds_the_same_unet_and_vae_in_diffusers(students, tmp_path, cli):
    """diffusers' ldm-config reader (create_unet_diffusers_config_from_ldm, the path A1111-style
    checkpoints take without a diffusers config) builds the model from our .yaml."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "bk-base.safetensors"
    assert cli("export", students["bk-base"], "--format", "single-file", "-o", out).code == 0
    ref = StableDiffusionPipeline.from_pretrained(students["bk-base"], safety_checker=None)
    sf = StableDiffusionPipeline.from_single_file(
        str(out), original_config=str(out.with_suffix(".yaml")), text_encoder=ref.text_encoder,
        tokenizer=ref.tokenizer, safety_checker=None, local_files_only=True)
    assert sf.unet.config.layers_per_block == 1 and sf.unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    _assert_same(_outputs(ref), _outputs(sf))


@pytest.mark.parametrize("arch,comfy,a1111", [
    ("sd-v1.4", "yes", "yes: put it in models/Stable-diffusion/"),
    ("bk-base", "yes", "yes: put it in models/Stable-diffusion/ together with the .yaml beside it"),
    ("bk-small", "yes", "no: its ldm UNetModel cannot be built without a mid block"),
    ("bk-tiny", "yes", "no: its ldm UNetModel cannot be built without a mid block"),
])
def test_client_verdicts_on_the_real_sd_v1_shapes(arch, comfy, a1111):
    from personalize.architectures import SD_V1_UNET_CONFIG, build_unet, get_arch, student_config
    from personalize.export.ldm_layout import unet_layout
    from personalize.export.single_file import clients

    cfg = SD_V1_UNET_CONFIG if arch == "sd-v1.4" else student_config(SD_V1_UNET_CONFIG, get_arch(arch))
    who = clients(unet_layout(build_unet(cfg)), vae_groups=32, v2=False)
    assert who["ComfyUI"].startswith(comfy) and "SD1.x" in who["ComfyUI"]
    assert who["AUTOMATIC1111"].startswith(a1111)


def test_lora_run_is_fused_into_the_single_file(lora_run, tiny_base, tmp_path, cli):
    from diffusers import StableDiffusionPipeline

    from personalize.sources import load_fused, resolve_source

    out = tmp_path / "dog.safetensors"
    assert cli("export", lora_run, "--format", "single-file", "-o", out, "--lora-scale", "0.5").code == 0
    comps = load_fused(resolve_source(lora_run, lora_scale=0.5))
    fused = StableDiffusionPipeline(**{k: comps[k] for k in ("vae", "text_encoder", "tokenizer", "unet")},
                                    scheduler=comps["noise_scheduler"], safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    base = _outputs(StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None))
    want = _outputs(fused)
    assert (want["unet"] - base["unet"]).abs().max() > 1e-4  # the adapter is in there
    _assert_same(want, _outputs(_reload(out, tiny_base)), atol=1e-5)


def test_half_writes_fp16_and_stays_close(tiny_base, tmp_path, cli):
    out = tmp_path / "half.safetensors"
    assert cli("export", "tiny", "--format", "single-file", "-o", out, "--half").code == 0
    with safe_open(str(out), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    full = _outputs(_reload(out, tiny_base, torch_dtype=torch.float32))
    from diffusers import StableDiffusionPipeline

    ref = _outputs(StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None))
    _assert_same(ref, full, atol=5e-2)


@pytest.mark.parametrize("case", ["suffix", "not-a-model", "exists", "into-input"])
def test_bad_single_file_exports_are_one_line(case, tiny_base, tmp_path, cli):
    out = tmp_path / "m.safetensors"
    args = {"suffix": ["tiny", "-o", tmp_path / "m.ckpt"],
            "not-a-model": [tmp_path, "-o", out], "exists": ["tiny", "-o", out],
            "into-input": [tiny_base, "-o", tiny_base / "unet" / "m.safetensors"]}[case]
    if case == "exists":
        out.write_bytes(b"keep")
    r = cli("export", args[0], "--format", "single-file", *args[1:])
    assert r.code == 2 and r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, r.err
    if case == "exists":
        assert out.read_bytes() == b"keep" and not (tmp_path / "m.README.md").exists()


def test_kohya_ldm_names_apply_like_the_diffusers_adapter(lora_run, tiny_base, tmp_path, cli):
    """ComfyUI's rule for ldm-named keys (comfy/lora.py: lora_unet_<ldm path with _> -> the
    diffusion_model weight; W += alpha/rank * up @ down), applied to our single file and read back by
    diffusers' converter, equals the diffusers adapter fused; no key in diffusers naming remains."""
    from diffusers import StableDiffusionPipeline

    from personalize.sources import load_fused, resolve_source

    k_out, s_out = tmp_path / "ldm_lora.safetensors", tmp_path / "base.safetensors"
    assert cli("export", lora_run, "--format", "kohya", "--names", "ldm", "-o", k_out).code == 0
    assert cli("export", tiny_base, "--format", "single-file", "-o", s_out).code == 0
    lora, ckpt = load_file(str(k_out)), load_file(str(s_out))
    with safe_open(str(k_out), framework="pt") as f:
        assert f.metadata()["personalize_names"] == "ldm"
    unet_mods = {k.split(".")[0] for k in lora if k.startswith("lora_unet_")}
    assert unet_mods and all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                           "lora_unet_output_blocks_")) for m in unet_mods)
    target = {"lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_"): k
              for k in ckpt if k.startswith(UNET_PREFIX) and k.endswith(".weight")}
    dropped = [m for m in unet_mods if m not in target]
    from personalize.adapters import read_lora

    assert dropped == [] and len(unet_mods) == sum(c == "unet" for c, _ in read_lora(lora_run))
    for m in unet_mods:
        down, up, alpha = lora[f"{m}.lora_down.weight"], lora[f"{m}.lora_up.weight"], lora[f"{m}.alpha"]
        w = ckpt[target[m]]
        ckpt[target[m]] = w + (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    # the text encoder part keeps kohya's names (lora_te_text_model_...); apply it the same way
    for m in {k.split(".")[0] for k in lora if k.startswith("lora_te_")}:
        key = "cond_stage_model.transformer." + m[len("lora_te_"):].replace("text_model_", "text_model.", 1) \
            .replace("encoder_layers_", "encoder.layers.").replace("_self_attn_", ".self_attn.") + ".weight"
        down, up, alpha = lora[f"{m}.lora_down.weight"], lora[f"{m}.lora_up.weight"], lora[f"{m}.alpha"]
        ckpt[key] = ckpt[key] + (alpha / down.shape[0]) * up @ down
    merged = tmp_path / "applied.safetensors"
    from safetensors.torch import save_file

    save_file(ckpt, str(merged))
    comps = load_fused(resolve_source(lora_run))
    fused = StableDiffusionPipeline(**{k: comps[k] for k in ("vae", "text_encoder", "tokenizer", "unet")},
                                    scheduler=comps["noise_scheduler"], safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    _assert_same(_outputs(fused), _outputs(_reload(merged, tiny_base)), atol=1e-5)


def test_kohya_ldm_names_on_a_bk_layout_follow_its_own_numbering(students):
    """A LoRA on every attention projection of bk-tiny: ldm keys, applied by ComfyUI's rule to the
    single file and converted back by diffusers, change exactly the weights the diffusers names say."""
    from personalize.adapters import LoraLayer
    from personalize.export.kohya import to_kohya
    from personalize.export.ldm_layout import kohya_unet_namer, unet_layout
    from personalize.export.single_file import checkpoint_tensors
    from personalize.sources import load_components

    comps = load_components(students["bk-tiny"])
    unet = comps["unet"]
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0"):
            layers[("unet", name)] = LoraLayer(torch.randn(4, mod.in_features, generator=g),
                                               torch.randn(mod.out_features, 4, generator=g), 2.0)
    lora = to_kohya(layers, kohya_unet_namer(students["bk-tiny"]))
    ckpt, layout = checkpoint_tensors(comps)
    for (_, name), x in layers.items():
        key = "lora_unet_" + layout.ldm(name).replace(".", "_")
        assert torch.equal(lora[f"{key}.lora_down.weight"], x.down)
        ldm_w = UNET_PREFIX + layout.ldm(name) + ".weight"
        ckpt[ldm_w] = ckpt[ldm_w] + 0.5 * lora[f"{key}.lora_up.weight"] @ lora[f"{key}.lora_down.weight"]
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    back = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    sd = unet.state_dict()
    for (_, name), x in layers.items():
        torch.testing.assert_close(back[name + ".weight"], sd[name + ".weight"] + 0.5 * x.up @ x.down)
    untouched = set(sd) - {n + ".weight" for _, n in layers}
    assert all(torch.equal(back[k], sd[k]) for k in untouched)
    assert unet_layout(unet).mid_depth is None


def test_saved_text_encoders_use_transformers_4_names_and_load_in_5(students, tmp_path, lora_run, cli):
    """distill outputs, merged exports (and full runs, which share pipeline.save_pretrained) write
    `text_model.*` keys; transformers 5's CLIPTextModel loads them to the same weights."""
    from transformers import CLIPTextModel

    from personalize.backbones import build_tiny_components

    merged = tmp_path / "merged"
    assert cli("export", lora_run, "--format", "merged", "-o", merged).code == 0
    ref = build_tiny_components(1)["text_encoder"].state_dict()  # the students' teacher's encoder
    for d in (students["bk-small"], merged):
        saved = load_file(str(d / "text_encoder" / "model.safetensors"))
        assert saved and all(k.startswith("text_model.") for k in saved), list(saved)[:3]
        loaded = CLIPTextModel.from_pretrained(d / "text_encoder").state_dict()
        assert {"text_model." + k for k in loaded} == set(saved)
        assert all(torch.equal(loaded[k[len("text_model."):]], v) for k, v in saved.items())
    loaded = CLIPTextModel.from_pretrained(students["bk-small"] / "text_encoder").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.items())
    meta = json.loads((merged / "export.json").read_text())
    assert meta["merged_from"]


def test_full_run_exports_and_keeps_transformers_4_text_encoder_names(full_run, tmp_path, cli):
    from diffusers import StableDiffusionPipeline

    saved = load_file(str(full_run / "text_encoder" / "model.safetensors"))
    assert all(k.startswith("text_model.") for k in saved)
    out = tmp_path / "full.safetensors"
    r = cli("export", full_run, "--format", "single-file", "-o", out)
    assert r.code == 0, r.err
    ref = StableDiffusionPipeline.from_pretrained(full_run, safety_checker=None)
    _assert_same(_outputs(ref), _outputs(_reload(out, full_run)))
    with safe_open(str(out), framework="pt") as f:
        assert "full run" in f.metadata()["personalize_source"]


@pytest.fixture(scope="module")
def sd2_bk_base(tmp_path_factory) -> Path:
    """A bk-base student of an SD-v2-shaped teacher: OpenCLIP-width (1024) text encoder, linear
    transformer projections, 64-wide heads (SD-v2's num_head_channels) at small widths."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from distill.mapping import init_student_from_teacher
    from personalize.architectures import get_arch
    from personalize.backbones import build_tiny_components

    comps = build_tiny_components(2)
    tc = comps["text_encoder"].config
    torch.manual_seed(2)
    teacher = UNet2DConditionModel(
        sample_size=8, block_out_channels=(64, 64, 128, 128), layers_per_block=2, cross_attention_dim=1024,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), use_linear_projection=True,
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=[1, 1, 2, 2])
    comps["unet"], _ = init_student_from_teacher(teacher, get_arch("bk-base"))
    comps["vae"] = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=32, sample_size=64)
    comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(
        vocab_size=tc.vocab_size, hidden_size=1024, intermediate_size=64, num_hidden_layers=2, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
        pad_token_id=tc.pad_token_id))
    out = tmp_path_factory.mktemp("sd2") / "sd2-bk-base"
    StableDiffusionPipeline(**comps, requires_safety_checker=False).save_pretrained(out)
    return out


def test_sd_v2_layout_single_file_and_yaml_read_back_by_diffusers(sd2_bk_base, tmp_path, cli):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "sd2.safetensors"
    assert cli("export", sd2_bk_base, "--format", "single-file", "-o", out).code == 0
    sd = load_file(str(out))
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd
    ref = StableDiffusionPipeline.from_pretrained(sd2_bk_base, safety_checker=None)
    _assert_same(_outputs(ref), _outputs(_reload(out, sd2_bk_base)))
    yaml_text = out.with_suffix(".yaml").read_text()
    assert "FrozenOpenCLIPEmbedder" in yaml_text and "num_head_channels: 64" in yaml_text
    sf = StableDiffusionPipeline.from_single_file(
        str(out), original_config=str(out.with_suffix(".yaml")), text_encoder=ref.text_encoder,
        tokenizer=ref.tokenizer, safety_checker=None, local_files_only=True)
    got, want = _outputs(sf), _outputs(ref)
    _assert_same({"unet": want["unet"], "vae": want["vae"]}, {"unet": got["unet"], "vae": got["vae"]})


def test_format_specific_flags_are_refused_elsewhere(lora_run, tmp_path, cli):
    for args in (["--format", "merged", "--names", "ldm", "-o", tmp_path / "m"],
                 ["--format", "kohya", "--half", "-o", tmp_path / "k.safetensors"]):
        r = cli("export", lora_run, *args)
        assert r.code == 2 and "only for --format" in r.err
    assert not list(tmp_path.iterdir())
