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

# the flags each format takes (besides RUN_DIR, --format, -o, --overwrite), and a value to give each
TAKES = {
    "kohya": {"--names"},
    "merged": {"--lora-scale", "--base", "--allow-pickle"},
    "single-file": {"--lora-scale", "--base", "--allow-pickle", "--half"},
    "onnx": {"--lora-scale", "--base", "--allow-pickle", "--resolution"},
    "openvino": {"--lora-scale", "--base", "--allow-pickle", "--resolution", "--weight-format"},
    "coreml": {"--lora-scale", "--base", "--allow-pickle", "--resolution", "--quantize-nbits", "--attention",
               "--vae-encoder", "--bundle-resources"},
}
GIVE = {"--names": ["ldm"], "--lora-scale": ["0.5"], "--base": ["tiny"], "--allow-pickle": [], "--half": [],
        "--resolution": ["64"], "--weight-format": ["int8"], "--quantize-nbits": ["4"], "--attention": ["split_einsum"],
        "--vae-encoder": [], "--bundle-resources": []}
NOT_TAKEN = [(fmt, flag) for fmt in FORMATS for flag in GIVE if flag not in TAKES[fmt]]


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


@pytest.mark.parametrize("fmt,flag", NOT_TAKEN, ids=[f"{f}{g}" for f, g in NOT_TAKEN])
def test_a_flag_the_format_does_not_take_is_refused_naming_both(fmt, flag, tmp_path, cli):
    """Checked before the source is even looked at (RUN_DIR does not exist here)."""
    r = cli("export", tmp_path / "no-run", "--format", fmt, "-o", out_path(tmp_path, fmt), flag, *GIVE[flag])
    one_line(r, flag, fmt, "only for --format")
    nothing_written(tmp_path)


@pytest.mark.parametrize("fmt,flag", [("onnx", "--quantize-nbits"), ("onnx", "--attention"),
                                      ("coreml", "--weight-format"), ("kohya", "--half"), ("merged", "--names")])
def test_the_issues_ignored_flags_are_refused_on_a_real_run(fmt, flag, lora_run, tmp_path, cli):
    before = digest(lora_run)
    r = cli("export", lora_run, "--format", fmt, "-o", out_path(tmp_path, fmt), flag, *GIVE[flag])
    one_line(r, flag, fmt)
    nothing_written(tmp_path)
    assert digest(lora_run) == before


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
