"""`--class-images-runtime openvino`: prior-preservation class images drawn through a cached
OpenVINO export of the base, in their own cache entry (never mixed with torch's)."""

from __future__ import annotations

import json
import shutil
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


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit(path, fn):
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


DAMAGES = {  # what a killed copy, a full disk or a hand leaves in the cache
    "export-json-garbage": lambda out: (out / "export.json").write_text("{ not json"),
    "export-json-other-resolution": lambda out: _edit(out / "export.json", lambda r: r | {"resolution": 128}),
    "export-json-without-sizes": lambda out: _edit(out / "export.json", lambda r: {k: v for k, v in r.items()
                                                                                   if k != "sizes"}),
    "unet-bin-truncated": lambda out: _truncate(out / "unet" / "openvino_model.bin"),
    "xml-garbage-same-size": lambda out: (out / "vae_decoder" / "openvino_model.xml").write_bytes(
        b"\x07" * (out / "vae_decoder" / "openvino_model.xml").stat().st_size),
    "no-unet": lambda out: shutil.rmtree(out / "unet"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cached_export_is_rebuilt_not_trusted(damage, fresh_cache):
    pytest.importorskip("openvino")
    from personalize.class_images_openvino import ensure_export, openvino_class_pipeline
    from personalize.export.deploy.common import sizes
    from personalize.pipeline import generate
    from personalize.sources import resolve_base

    base = resolve_base("tiny")
    out = ensure_export(base, 64)
    DAMAGES[damage](out)
    pipe = openvino_class_pipeline(base, 64)
    rec = json.loads((out / "export.json").read_text())
    assert rec["format"] == "openvino" and rec["resolution"] == 64 and rec["sizes"] == sizes(out)
    (image,) = generate(pipe, ["a dog"], [0], steps=1, guidance_scale=7.5, resolution=64)
    assert image.size == (64, 64)


@pytest.mark.slow
def test_training_with_a_damaged_cached_export_rebuilds_it(fresh_cache, photos, tmp_path, cli):
    pytest.importorskip("openvino")
    from personalize.class_images_openvino import export_dir
    from personalize.sources import resolve_base

    def train(out, n):
        r = cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", out, *FAST,
                "--validation-images", "0", "--class-images", n, "--class-images-runtime", "openvino")
        assert r.code == 0, r.err
        return json.loads((out / "run.json").read_text())

    res = train(tmp_path / "a", 2)["resolution"]
    cached = export_dir(resolve_base("tiny"), res)
    want = (cached / "unet" / "openvino_model.bin").stat().st_size
    _truncate(cached / "unet" / "openvino_model.bin")
    info = train(tmp_path / "b", 3)["class_images"]  # one more class image: the export is needed again
    assert info["generated_now"] == 1
    assert (cached / "unet" / "openvino_model.bin").stat().st_size == want
