from __future__ import annotations

import time

import pytest

from personalize.backbones import BACKBONES, is_pipeline_dir, unet_param_count
from personalize.sources import resolve_base
from personalize.errors import UserError

ISSUE_NAMES = ["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "bk-sdm-base-2m", "bk-sdm-small-2m", "bk-sdm-tiny-2m",
               "bk-sdm-v2-base", "bk-sdm-v2-small", "bk-sdm-v2-tiny", "sd-v1.4", "sd-v2.1-base", "small-sd-v0"]


def test_registry_has_every_named_backbone_with_a_hub_id():
    for name in ISSUE_NAMES:
        assert BACKBONES[name].hub_id
    assert BACKBONES["bk-sdm-base"].hub_id == "nota-ai/bk-sdm-base"


def test_tiny_is_built_cached_and_loadable(tiny_base):
    from diffusers import StableDiffusionPipeline

    assert is_pipeline_dir(tiny_base)
    again = resolve_base("tiny")
    assert again.path == tiny_base and again.source == "built-in"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    assert len(pipe.unet.down_blocks) == 4  # SD-v1 shaped: prunable by distill
    assert unet_param_count(tiny_base) == sum(p.numel() for p in pipe.unet.parameters())


def test_tiny_seed_changes_weights():
    from personalize.backbones import build_tiny_components

    a = build_tiny_components(0)["unet"].conv_in.weight
    b = build_tiny_components(1)["unet"].conv_in.weight
    assert not (a == b).all()


def test_offline_miss_is_fast_and_one_line():
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        resolve_base("bk-sdm-tiny")
    assert time.perf_counter() - t < 5  # HF_HUB_OFFLINE: no 24 s of retries
    assert "nota-ai/bk-sdm-tiny" in str(e.value) and "\n" not in str(e.value)


def test_local_dir_and_unknown_names(tmp_path, tiny_base):
    assert resolve_base(str(tiny_base)).source == "local"
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        resolve_base(str(tmp_path))
    with pytest.raises(UserError, match="unknown base"):
        resolve_base("nonsense")


def test_backbones_and_subjects_commands_list_everything(cli, dataset):
    r = cli("backbones")
    assert r.code == 0
    for name in ISSUE_NAMES:
        assert name in r.out
    r = cli("subjects", "--data-dir", dataset)
    assert r.code == 0 and "backpack_dog" in r.out and "missing" in r.out


def test_subjects_and_prompts_ship_with_the_package():
    from personalize.subjects import load_prompts, load_subjects

    subjects = load_subjects()
    assert len(subjects) == 30 and subjects["dog6"].kind == "live" and subjects["vase"].kind == "object"
    assert len({s.class_noun for s in subjects.values()}) == 15
    for kind in ("live", "object"):
        prompts = load_prompts(kind)
        assert len(prompts) == 25 and all("{token}" in p and "{class}" in p for p in prompts)


def test_wheel_contains_data_files(tmp_path):
    """A non-editable install must find subjects/ and prompts/ (force-included into the wheel)."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    pytest.importorskip("hatchling")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("personalize-*.whl"))).namelist()
    for f in ("personalize/_data/subjects/subjects.csv", "personalize/_data/prompts/live.txt",
              "personalize/_data/prompts/object.txt", "distill/__init__.py", "personalize/presets/bk-sdm.toml"):
        assert f in names
