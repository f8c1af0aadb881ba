"""`--class-images-runtime openvino`: prior-preservation class images drawn through a cached
OpenVINO export of the base, in their own cache entry (never mixed with torch's)."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from conftest import FAST


def test_openvino_class_images_have_their_own_cache_entry(fresh_cache, photos, tmp_path, cli):
    pytest.importorskip("openvino")
    from personalize.sources import resolve_base
    from personalize.class_images import class_image_dir
    from personalize.class_images_openvino import export_dir, inference_precision

    out = tmp_path / "run"
    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", out, *FAST,
            "--validation-images", "0", "--class-images-runtime", "openvino")
    assert r.code == 0, r.err
    info = json.loads((out / "run.json").read_text())["class_images"]
    base = resolve_base("tiny")
    res = json.loads((out / "run.json").read_text())["resolution"]
    want = class_image_dir(base, "a dog", res, "openvino")
    assert info["runtime"] == "openvino" and info["generated_now"] == 2 and info["dir"] == str(want)
    assert want.name.endswith(f"-openvino-{inference_precision()}") and want.parent.is_relative_to(fresh_cache)
    assert not class_image_dir(base, "a dog", res).exists()  # nothing went through torch's entry
    pngs = sorted(want.glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).text.get("runtime") == "openvino"
    assert json.loads((export_dir(base, res) / "export.json").read_text())["format"] == "openvino"


def test_without_the_extra_is_one_line(fresh_cache, photos, tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    out = tmp_path / "run"
    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", out, *FAST,
            "--class-images-runtime", "openvino")
    assert r.code == 2
    assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, r.err
    assert "personalize[openvino]" in r.err and "--class-images-runtime" in r.err
    assert not out.exists()
