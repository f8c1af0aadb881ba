"""personalize/export/ldm_layout.py on the real SD-v1.4 U-Net config and its BK-SDM students
(base/small/tiny: `distill`'s block removal), all on the meta device (no weights, no memory).

Independent readers: diffusers' own ldm -> diffusers converter (`convert_ldm_unet_checkpoint`,
what `from_single_file` runs) must give back every diffusers name; ComfyUI's detection of the U-Net
config from ldm keys (comfy/model_detection.py `detect_unet_config`: residual blocks counted between
`input_blocks.N.0.op` downsamplers, the mid block from `middle_block.*` keys) must find the real
block counts; and the kohya `--names ldm` keys must each name a module both clients have:
ComfyUI's comfy/lora.py `model_lora_keys_unet` maps `lora_unet_<k without diffusion_model. and
.weight, dots as _>` for every `diffusion_model.*.weight` key of the model, and A1111's
extensions-builtin/Lora/networks.py, when `convert_diffusers_name_to_compvis` finds no diffusers
pattern (its regexes all start `lora_unet_(conv_in|conv_out|time_embedding|down_blocks|mid_block|
up_blocks)`), looks `lora_unet` -> `diffusion_model` up among the ldm model's module names with
dots as `_` (its network_layer_mapping). Both rules are restated here from that code.
"""

from __future__ import annotations

import re

import pytest
import torch

from personalize.architectures import SD_V1_UNET_CONFIG, build_unet, get_arch, student_config
from personalize.export.ldm_layout import UNET_PREFIX, kohya_unet_namer, unet_layout

ARCHS = ["sd-v1.4", "bk-base", "bk-small", "bk-tiny"]
# A1111's diffusers-name patterns (networks.py convert_diffusers_name_to_compvis), as prefixes
A1111_DIFFUSERS_PATTERNS = re.compile(r"lora_unet_(conv_in|conv_out|time_embedding_linear_|down_blocks_|mid_block_|up_blocks_)")


def _config(arch: str) -> dict:
    return dict(SD_V1_UNET_CONFIG) if arch == "sd-v1.4" else student_config(SD_V1_UNET_CONFIG, get_arch(arch))


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    cfg = _config(request.param)
    unet = build_unet(cfg)
    return request.param, cfg, unet, unet_layout(unet)


def test_diffusers_own_converter_reads_every_tensor_back(case):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    arch, cfg, unet, layout = case
    names = list(unet.state_dict())
    ldm = {UNET_PREFIX + layout.ldm_keys[k]: k for k in names}  # the value says where it came from
    assert len(ldm) == len(names)  # no two tensors on one ldm name
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back == {k: k for k in names}


def _comfy_block_map(down_res: list[int], depth: list[int], up_depth: list[int]) -> dict[str, str]:
    """ComfyUI's comfy/utils.py `unet_to_diffusers` numbering, restated in closed form: down stage x
    block i is input_blocks[1 + (res[x] + 1) * x + i] (each stage's downsampler the slot after its
    blocks), up stage x block i is output_blocks[(res_up[x] + 1) * x + i] with the upsampler on the
    stage's last block at `.1.conv`, or `.2.conv` when that block has a transformer."""
    m = {}
    for x, r in enumerate(down_res):
        for i in range(r):
            n = 1 + (r + 1) * x + i
            m[f"down_blocks.{x}.resnets.{i}"] = f"input_blocks.{n}.0"
            if depth[x]:
                m[f"down_blocks.{x}.attentions.{i}"] = f"input_blocks.{n}.1"
        if x < len(down_res) - 1:
            m[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{1 + (r + 1) * x + r}.0.op"
    up_res = list(reversed(down_res))
    for x, r in enumerate(up_res):
        for i in range(r + 1):
            n = (r + 1) * x + i
            m[f"up_blocks.{x}.resnets.{i}"] = f"output_blocks.{n}.0"
            if up_depth[x]:
                m[f"up_blocks.{x}.attentions.{i}"] = f"output_blocks.{n}.1"
            if i == r and x < len(up_res) - 1:
                m[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if up_depth[x] else 1}.conv"
    return m


def test_block_numbering_is_comfyuis(case):
    arch, cfg, unet, layout = case
    want = _comfy_block_map(list(layout.down_res), list(layout.down_depth), list(layout.up_depth))
    block = re.compile(r"(down|up)_blocks\.\d+\.((resnets|attentions)\.\d+|(down|up)samplers\.0\.conv)")
    assert {k: v for k, v in layout.modules.items() if block.fullmatch(k)} == want


def _comfy_detect(keys: list[str]) -> tuple[list[int], int]:
    """ComfyUI's residual blocks per stage and mid-block code (-2: none) from ldm U-Net keys."""
    n_in = max(int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.")) + 1
    res, last = [], 0
    for i in range(n_in):
        if f"input_blocks.{i}.0.op.weight" in keys:
            res.append(last)
            last = 0
        elif f"input_blocks.{i}.0.in_layers.0.weight" in keys:
            last += 1
    res.append(last)
    mid = (1 if "middle_block.1.proj_in.weight" in keys else -1 if "middle_block.0.in_layers.0.weight" in keys else -2)
    return res, mid


def test_comfyui_detects_the_real_block_counts(case):
    arch, cfg, unet, layout = case
    keys = set(layout.ldm_keys.values())
    res, mid = _comfy_detect(sorted(keys))
    assert res == [len(b.resnets) for b in unet.down_blocks] == list(layout.down_res)
    assert mid == (1 if unet.mid_block is not None else -2)
    assert layout.is_sd_layout == (arch == "sd-v1.4")
    assert layout.num_res_blocks == (2 if arch == "sd-v1.4" else 1)
    assert len(layout.down_res) == (3 if arch == "bk-tiny" else 4)


def test_kohya_ldm_names_map_every_module_in_comfyui_and_a1111(case, tmp_path):
    import json

    arch, cfg, unet, layout = case
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(cfg))
    namer = kohya_unet_namer(tmp_path)
    ldm_weights = {UNET_PREFIX[len("model."):] + v for v in layout.ldm_keys.values()}  # diffusion_model.*
    comfy = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")
             for k in ldm_weights if k.endswith(".weight")}
    a1111 = {k.rsplit(".", 1)[0].replace(".", "_") for k in ldm_weights}  # module names, dots as _
    targets = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    mapped = dropped = 0
    for module in targets:
        key = "lora_unet_" + namer(module).replace(".", "_")
        assert not A1111_DIFFUSERS_PATTERNS.match(key)  # never mistaken for (and mixed with) diffusers names
        ok = key in comfy and key.replace("lora_unet", "diffusion_model", 1) in a1111
        mapped, dropped = mapped + ok, dropped + (not ok)
    assert (mapped, dropped) == (len(targets), 0)
    # the second down stage starts at input_blocks.4 in SD-v1 (2 blocks + downsampler before it) and
    # at input_blocks.3 in every BK student (1 + downsampler): SD-v1's numbering would misplace it
    first_attn = namer("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert first_attn.startswith("input_blocks.4.1." if arch == "sd-v1.4" else "input_blocks.3.1.")


def test_a_unet_part_without_ldm_place_is_refused():
    from personalize.errors import UserError

    cfg = dict(SD_V1_UNET_CONFIG, class_embed_type="timestep")
    with pytest.raises(UserError, match="no place"):
        unet_layout(build_unet(cfg))


def test_sd_v2_text_encoder_round_trips_through_diffusers_open_clip_reader():
    """SD-v2's text encoder (width 1024: OpenCLIP ViT-H) goes out in open_clip's names, q/k/v
    fused into in_proj; diffusers' convert_open_clip_checkpoint reads every tensor back."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from personalize.export.ldm_layout import OPENCLIP_PREFIX, text_encoder_to_ldm

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=1024, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1))
    ldm = text_encoder_to_ldm(te)
    assert f"{OPENCLIP_PREFIX}transformer.resblocks.1.attn.in_proj_weight" in ldm
    back = convert_open_clip_checkpoint(te, ldm)
    sd = {k: v for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    assert {k.removeprefix("text_model.") for k in back} == set(sd)
    assert all(torch.equal(back[k] if k in back else back["text_model." + k], v) for k, v in sd.items())
