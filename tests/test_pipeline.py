"""Weight loading: streamed half-precision loads equal diffusers/transformers' own; pickles refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from personalize.errors import UserError
from personalize.pipeline import check_safetensors, iter_safetensors, load_cast


@pytest.mark.parametrize("sub", ["unet", "text_encoder"])
def test_streamed_bf16_load_equals_from_pretrained(sub, tiny_base):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = UNet2DConditionModel if sub == "unet" else CLIPTextModel
    ours = load_cast(cls, tiny_base / sub, torch.bfloat16).state_dict()
    ref = cls.from_pretrained(tiny_base, subfolder=sub, torch_dtype=torch.bfloat16).state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    assert not any(t.is_meta for t in ours.values())


def test_iter_safetensors_reads_every_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half(),
               "d": torch.randn(2, 2).bfloat16(), "e": torch.zeros(0)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    got = dict(iter_safetensors(tmp_path / "x.safetensors"))
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)


def test_unknown_keys_fall_back_to_from_pretrained(tiny_base, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "unet"
    shutil.copytree(tiny_base / "unet", folder)
    f = next(folder.glob("*.safetensors"))
    sd = dict(iter_safetensors(f))
    sd["some.legacy.key"] = torch.zeros(1)
    save_file(sd, f)
    m = load_cast(UNet2DConditionModel, folder, torch.bfloat16)  # from_pretrained ignores the extra key
    assert m.dtype == torch.bfloat16


def test_pickle_only_base_is_refused_unless_allowed(tiny_base, tmp_path):
    base = tmp_path / "pickled"
    shutil.copytree(tiny_base, base)
    for f in (base / "unet").glob("*.safetensors"):
        f.unlink()
    (base / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="only pickle weights .* --allow-pickle"):
        check_safetensors(base, allow_pickle=False)
    check_safetensors(base, allow_pickle=True)


def test_allow_pickle_loads_pickled_and_safetensors_pipelines(tiny_base, tmp_path):
    """--allow-pickle permits pickles; it must not turn into "pickles only" for a safetensors base."""
    from diffusers import StableDiffusionPipeline

    from personalize.sources import load_components

    pickled = tmp_path / "pickled"
    StableDiffusionPipeline.from_pretrained(tiny_base).save_pretrained(pickled, safe_serialization=False)
    # transformers 5 always writes safetensors: a mixed pipeline, pickled U-Net and VAE
    assert not list((pickled / "unet").glob("*.safetensors")) and list((pickled / "unet").glob("*.bin"))
    with pytest.raises(UserError, match="--allow-pickle"):
        load_components(pickled)
    a = load_components(pickled, allow_pickle=True)["unet"].state_dict()
    b = load_components(tiny_base, allow_pickle=True)["unet"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
