"""Issue 25 on `personalize export`, every format (kohya, merged, single-file, onnx, openvino,
coreml): a damaged input, an input of the wrong kind, an out-of-range number, a flag the format
does not take or a second writer of -o is one line `error: <what>: <why>` naming the culprit,
exit 2, no traceback, the input untouched and nothing written (no output, no temp folder)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

FORMATS = ("kohya", "merged", "single-file", "onnx", "openvino", "coreml")
FILE_FORMATS = ("kohya", "single-file")  # -o is a file; the others write a folder
EXTRA = {"onnx": "onnxruntime", "openvino": "openvino", "coreml": "coremltools"}

def one_line(r, *fragments):
    lines = r.err.strip().splitlines()
    assert r.code == 2, (r.code, r.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.err, r.err
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])


def out_path(tmp_path, fmt):
    return tmp_path / ("out.safetensors" if fmt in FILE_FORMATS else "out")


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def nothing_written(tmp_path, *keep):
    """Only what the test made itself is in tmp_path: no output, no temp folder, no lock left."""
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)
    assert left == [], left


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "coreml"])
@pytest.mark.parametrize("value", ["4096", "1048576"])
def test_an_out_of_range_resolution_is_refused_before_any_model_is_loaded(fmt, value, lora_run, tmp_path, cli,
                                                                          monkeypatch):
    pytest.importorskip(EXTRA[fmt])
    import personalize.export.deploy as deploy

    monkeypatch.setattr(deploy, "load_fused", lambda *a, **k: pytest.fail("a model was loaded"))
    r = cli("export", lora_run, "--format", fmt, "--resolution", value, "-o", tmp_path / "out")
    one_line(r, "--resolution", value, "2048")
    nothing_written(tmp_path)
