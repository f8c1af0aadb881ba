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


def _truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])


@pytest.fixture(scope="module")
def damaged(lora_run, tiny_base, tmp_path_factory):
    """name -> (an input, the file at fault in it)."""
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for name, damage in (("run-json", lambda r: (r / "run.json").write_text("{ not json")),
                         ("adapter-garbage", lambda r: (r / "pytorch_lora_weights.safetensors").write_bytes(b"\x07" * 4096)),
                         ("adapter-truncated", lambda r: _truncate(r / "pytorch_lora_weights.safetensors"))):
        shutil.copytree(lora_run, root / name)
        damage(root / name)
        out[name] = (root / name, root / name / ("run.json" if name == "run-json" else "pytorch_lora_weights.safetensors"))
    base = root / "base"
    shutil.copytree(tiny_base, base)
    (unet,) = (base / "unet").glob("*.safetensors")
    _truncate(unet)
    out["base"] = (base, unet)
    run = root / "run-on-damaged-base"  # the run's base (where run.json says it is) is damaged
    shutil.copytree(lora_run, run)
    rec = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(rec | {"base": rec["base"] | {"path": str(base), "name": str(base)}}))
    out["run-on-damaged-base"] = (run, unet)
    return out


DAMAGED = [(fmt, d) for fmt in FORMATS for d in ("run-json", "adapter-garbage", "adapter-truncated", "run-on-damaged-base",
                                                 "base")
           if not (fmt == "kohya" and d == "run-on-damaged-base")  # kohya reads only the adapter
           and not (fmt in ("kohya", "merged") and d == "base")]  # a base for them is a wrong kind (below)


@pytest.mark.parametrize("fmt,which", DAMAGED, ids=[f"{f}-{d}" for f, d in DAMAGED])
def test_a_damaged_input_is_one_line_naming_the_file(fmt, which, damaged, tmp_path, cli):
    if fmt in EXTRA:
        pytest.importorskip(EXTRA[fmt])
    src, culprit = damaged[which]
    before = digest(src)
    one_line(cli("export", src, "--format", fmt, "-o", out_path(tmp_path, fmt)), culprit)
    nothing_written(tmp_path)
    assert digest(src) == before


@pytest.fixture(scope="module")
def other_exports(tiny_base, tmp_path_factory):
    """A real ONNX export of the tiny base, and a folder a Core ML export wrote (export.json and
    its parts' folders: its packages do not matter here)."""
    from personalize.cli import main

    root = tmp_path_factory.mktemp("other-exports")
    if _have("onnxruntime"):
        assert main(["export", str(tiny_base), "--format", "onnx", "-o", str(root / "onnx")]) == 0
    for part in ("TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"):
        (root / "coreml" / part).mkdir(parents=True)
    (root / "coreml" / "export.json").write_text(json.dumps({"format": "coreml", "resolution": 64, "base": "tiny"}))
    return root


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


WRONG_KIND = {  # name -> (the input, the formats it is tried with)
    "a-file": (lambda d: d["lora"] / "pytorch_lora_weights.safetensors", FORMATS),
    "an-onnx-export": (lambda d: d["exports"] / "onnx", FORMATS if _have("onnxruntime") else ()),
    "a-coreml-export": (lambda d: d["exports"] / "coreml", FORMATS),
    "a-base": (lambda d: "tiny", ("kohya", "merged")),
    "a-full-run": (lambda d: d["full"], ("kohya", "merged")),
    "an-empty-folder": (lambda d: d["empty"], FORMATS),
}
WRONG = [(fmt, k) for k, (_, fmts) in WRONG_KIND.items() for fmt in fmts]


@pytest.mark.parametrize("fmt,kind", WRONG, ids=[f"{f}-{k}" for f, k in WRONG])
def test_a_wrong_kind_of_input_is_one_line_naming_it(fmt, kind, lora_run, full_run, other_exports, tmp_path, cli):
    if fmt in EXTRA:
        pytest.importorskip(EXTRA[fmt])
    (tmp_path / "empty").mkdir()
    src = WRONG_KIND[kind][0]({"lora": lora_run, "full": full_run, "exports": other_exports, "empty": tmp_path / "empty"})
    r = cli("export", src, "--format", fmt, "-o", out_path(tmp_path, fmt))
    one_line(r, src)
    nothing_written(tmp_path, "empty")


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_output_of_the_wrong_kind_is_one_line(fmt, lora_run, tmp_path, cli):
    if fmt in EXTRA:
        pytest.importorskip(EXTRA[fmt])
    out = out_path(tmp_path, fmt)
    out.mkdir() if fmt in FILE_FORMATS else out.write_text("a file")
    one_line(cli("export", lora_run, "--format", fmt, "-o", out, "--overwrite"), out)
    assert out.is_dir() == (fmt in FILE_FORMATS)
    nothing_written(tmp_path, out.name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_second_writer_of_one_output_is_refused(fmt, lora_run, tmp_path, cli):
    """Another process exporting into -o holds its lock (here: this process, through another open file)."""
    from personalize.outputs import lock_path, output_lock

    if fmt in EXTRA:
        pytest.importorskip(EXTRA[fmt])
    out = out_path(tmp_path, fmt)
    with output_lock(out):
        r = cli("export", lora_run, "--format", fmt, "-o", out)
        one_line(r, out, "is writing it")
        assert not out.exists()
        nothing_written(tmp_path, lock_path(out).name)
    nothing_written(tmp_path)


@pytest.mark.slow
def test_the_real_entry_point_prints_one_line_for_a_coreml_export(tmp_path):
    """Only the error on stderr: coremltools logs its version warnings as it is imported."""
    import subprocess
    import sys

    pytest.importorskip("coremltools")
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "personalize", "export", str(tmp_path / "empty"), "--format", "coreml",
                        "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(tmp_path / "empty") in r.stderr and not (tmp_path / "out").exists()


OUT_OF_RANGE = [(fmt, flag, value) for fmt in FORMATS for flag, value in (
    ("--lora-scale", "100"), ("--lora-scale", "nan"), ("--resolution", "60"), ("--resolution", "0"),
    ("--resolution", "-64"), ("--quantize-nbits", "5"), ("--quantize-nbits", "9")) if flag in TAKES[fmt]]


@pytest.mark.parametrize("fmt,flag,value", OUT_OF_RANGE, ids=[f"{f}{g}={v}" for f, g, v in OUT_OF_RANGE])
def test_an_out_of_range_number_is_one_line_naming_the_flag(fmt, flag, value, tmp_path, cli):
    r = cli("export", tmp_path / "no-run", "--format", fmt, "-o", out_path(tmp_path, fmt), flag, value)
    one_line(r, flag)
    nothing_written(tmp_path)
