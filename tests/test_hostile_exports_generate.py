"""Issue 25 on `personalize generate` with an ONNX or OpenVINO export (and on torch where the case
is the runtime's): a damaged part, an input of the wrong kind, an out-of-range number or a second
writer of -o is one line `error: <what>: <why>` naming the culprit, exit 2, no traceback, the
export untouched and nothing written.

One export per runtime of the bare tiny base (module-scoped, seconds each); every case damages a
copy of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from _export_helpers import files

RUNTIME_EXTRAS = {"onnx": "onnxruntime", "openvino": "openvino"}
MODEL = {"onnx": ("model.onnx",), "openvino": ("openvino_model.xml", "openvino_model.bin")}
GEN = ["--prompt", "a photo", "--steps", "1", "--seed", "1"]


def _runtimes():
    return [pytest.param(r, marks=pytest.mark.skipif(not _have(m), reason=f"no {m}")) for r, m in RUNTIME_EXTRAS.items()]


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def exports(tiny_base, tmp_path_factory):
    """runtime -> an export of the bare tiny base on it."""
    from personalize.cli import main

    root = tmp_path_factory.mktemp("hostile-exports")
    for runtime, module in RUNTIME_EXTRAS.items():
        if _have(module):
            assert main(["export", str(tiny_base), "--format", runtime, "-o", str(root / runtime)]) == 0
    return root


def one_line(r, *fragments):
    lines = r.err.strip().splitlines()
    assert r.code == 2, (r.code, r.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.err, r.err
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])


def damage(path, how):
    """Damage a file the ways a disk, a copy or a hand do."""
    if how == "rm":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\x07" * max(4096, path.stat().st_size))
    elif how == "json":
        path.write_text("{ not json")
    elif callable(how):  # edit a JSON object
        rec = json.loads(path.read_text())
        path.write_text(json.dumps(how(rec)))
    else:
        raise AssertionError(how)


def _copy(exports, runtime, tmp_path):
    src = tmp_path / "export"
    shutil.copytree(exports / runtime, src)
    return src


def _generate_is_one_line(src, tmp_path, cli, *fragments):
    before = {f: (src / f).read_bytes() for f in files(src)}
    r = cli("generate", src, *GEN, "-o", tmp_path / "out")
    one_line(r, *fragments)
    assert {f: (src / f).read_bytes() for f in files(src)} == before  # the input untouched
    assert not (tmp_path / "out").exists()
    return r


def _model_damages(runtime):
    m, *rest = MODEL[runtime]
    cases = [("unet", m, "truncate"), ("text_encoder", m, "empty"), ("vae_decoder", m, "garbage"),
             ("vae_decoder", m, "rm")]
    if rest:  # openvino: the weights beside the graph
        cases += [("unet", rest[0], "truncate"), ("text_encoder", rest[0], "garbage"), ("vae_decoder", rest[0], "rm")]
    return cases


MODEL_CASES = [(r, *c) for r in RUNTIME_EXTRAS for c in _model_damages(r)]


@pytest.mark.parametrize("runtime,folder,name,how", MODEL_CASES, ids=["-".join(c[:3]) + "-" + c[3] for c in MODEL_CASES])
def test_a_damaged_model_file_is_one_line_naming_it(runtime, folder, name, how, exports, tmp_path, cli):
    pytest.importorskip(RUNTIME_EXTRAS[runtime])
    src = _copy(exports, runtime, tmp_path)
    damage(src / folder / name, how)
    # OpenVINO cannot always tell which of its two files is damaged: then both are named
    _generate_is_one_line(src, tmp_path, cli, src / folder, name)


@pytest.mark.parametrize("runtime", _runtimes())
def test_another_models_file_in_a_folder_is_one_line_naming_it(runtime, exports, tmp_path, cli):
    """A valid model, but the text encoder's, where the U-Net belongs (a copy gone wrong)."""
    src = _copy(exports, runtime, tmp_path)
    for name in MODEL[runtime]:
        shutil.copy(src / "text_encoder" / name, src / "unet" / name)
    _generate_is_one_line(src, tmp_path, cli, src / "unet" / MODEL[runtime][0], "not a unet")


PART_CASES = [  # (file, damage, the culprit named, a fragment of the why)
    ("unet/config.json", "rm", "unet/config.json", "missing"),
    ("vae_decoder/config.json", "json", "vae_decoder/config.json", "damaged"),
    ("text_encoder/config.json", lambda c: [c], "text_encoder/config.json", "not a model config"),
    ("unet/config.json", lambda c: {k: v for k, v in c.items() if k != "in_channels"}, "unet/config.json", "in_channels"),
    ("vae_decoder/config.json", lambda c: c | {"scaling_factor": "big"}, "vae_decoder/config.json", "scaling_factor"),
    ("tokenizer/tokenizer.json", "garbage", "tokenizer", "damaged"),
    ("tokenizer/tokenizer_config.json", "rm", "tokenizer", "tokens"),
    ("tokenizer/tokenizer_config.json", lambda c: c | {"model_max_length": 5}, "tokenizer", "tokens"),
    ("scheduler/scheduler_config.json", "json", "scheduler", ""),
    ("scheduler/scheduler_config.json", "rm", "scheduler", ""),
]


@pytest.mark.parametrize("runtime", _runtimes())
@pytest.mark.parametrize("rel,how,culprit,why", PART_CASES,
                         ids=[f"{i}-{c[0]}-{c[1] if isinstance(c[1], str) else 'edited'}" for i, c in enumerate(PART_CASES)])
def test_a_damaged_config_tokenizer_or_scheduler_is_one_line_naming_it(runtime, rel, how, culprit, why, exports,
                                                                       tmp_path, cli):
    src = _copy(exports, runtime, tmp_path)
    damage(src / rel, how)
    _generate_is_one_line(src, tmp_path, cli, src / culprit, why)


RECORD_CASES = [  # (damage, a fragment of the why)
    ("json", "damaged"),
    (lambda r: [r], "no format"),
    (lambda r: r | {"format": 7}, "no format"),
    (lambda r: r | {"format": "tflite"}, "unknown format 'tflite'"),
    (lambda r: {k: v for k, v in r.items() if k != "runtime"}, "field runtime"),
    (lambda r: r | {"runtime": "tensorrt"}, "field runtime"),
    (lambda r: {k: v for k, v in r.items() if k != "resolution"}, "field resolution"),
    (lambda r: r | {"resolution": "64"}, "field resolution"),
    (lambda r: r | {"resolution": None}, "field resolution"),
    (lambda r: r | {"resolution": -64}, "field resolution"),
    (lambda r: r | {"resolution": True}, "field resolution"),
    (lambda r: r | {"resolution": 1 << 20}, "field resolution"),
    (lambda r: r | {"resolution": 100}, "field resolution"),
    (lambda r: {k: v for k, v in r.items() if k != "base"}, "field base"),
    (lambda r: r | {"base": ["tiny"]}, "field base"),
    (lambda r: r | {"run": 5}, "field run"),
    (lambda r: r | {"run": {"subject": "dog"}}, "field run"),
]


@pytest.mark.parametrize("runtime", _runtimes())
@pytest.mark.parametrize("how,why", RECORD_CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(RECORD_CASES)])
def test_a_bad_export_json_is_one_line_naming_it_and_the_field(runtime, how, why, exports, tmp_path, cli):
    src = _copy(exports, runtime, tmp_path)
    damage(src / "export.json", how)
    _generate_is_one_line(src, tmp_path, cli, src / "export.json", why)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", _runtimes())
def test_the_real_entry_point_prints_one_line_for_a_damaged_model(runtime, exports, tmp_path):
    """Not only Python's stderr: nothing the runtimes print from C++ (OpenVINO's other frontends
    log to the process's stderr when handed a file that is not IR)."""
    src = _copy(exports, runtime, tmp_path)
    damage(src / "unet" / MODEL[runtime][0], "garbage")
    r = subprocess.run([sys.executable, "-m", "personalize", "generate", str(src), *GEN, "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(src / "unet" / MODEL[runtime][0]) in r.stderr and not (tmp_path / "out").exists()


OUT_OF_RANGE = [  # (flags, the flag named)
    (["--resolution", "4096"], "--resolution"),
    (["--resolution", "1048576"], "--resolution"),
    (["--resolution", "60"], "--resolution"),
    (["--steps", "0"], "--steps"),
    (["--steps", "100000"], "--steps"),
    (["--guidance-scale", "-1"], "--guidance-scale"),
    (["--guidance-scale", "1e9"], "--guidance-scale"),
    (["-n", "0"], "--images-per-prompt"),
    (["--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("runtime", ["torch", *_runtimes()])
@pytest.mark.parametrize("flags,named", OUT_OF_RANGE, ids=[" ".join(c[0]) for c in OUT_OF_RANGE])
def test_out_of_range_numbers_are_one_line_on_every_runtime(runtime, flags, named, exports, tiny_base, tmp_path, cli,
                                                           monkeypatch):
    import personalize.generate as gen

    monkeypatch.setattr(gen, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    src = ["--base", tiny_base] if runtime == "torch" else [exports / runtime]
    r = cli("generate", *src, "--prompt", "a photo", *flags, "-o", tmp_path / "out")
    one_line(r, named)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ['"abc"', "null", "-64", "0", "100", "[64]", "1e9", "true", "4096"])
def test_a_run_json_resolution_that_is_not_a_size_is_one_line_naming_it(value, lora_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    rec = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(rec | {"resolution": json.loads(value)}))
    for argv in (["generate", run, "--prompt", "x", "--steps", "1"], ["export", run, "--format", "onnx"]):
        one_line(cli(*argv, "-o", tmp_path / "out"), run / "run.json", "resolution")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("base", "5"), ("base", '{"name": 5}'), ("token", "[1]"),
                                         ("instance_prompt", "{}")])
def test_other_run_json_fields_generate_reads_are_checked(field, value, lora_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    rec = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(rec | {field: json.loads(value)}))
    one_line(cli("generate", run, "-o", tmp_path / "out"), run / "run.json", field)
    assert not (tmp_path / "out").exists()


def _damage_bytes(f, how):
    data = f.read_bytes()
    if how == "short":  # shorter than the 8-byte header length
        f.write_bytes(data[:4])
    elif how == "header":  # the JSON header garbled, the size kept
        n = int.from_bytes(data[:8], "little")
        f.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    else:
        damage(f, how)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("component,how", [("unet", "truncate"), ("unet", "short"), ("text_encoder", "truncate"),
                                           ("text_encoder", "header"), ("vae", "garbage"), ("vae", "short")])
def test_a_damaged_base_weights_file_is_one_line_naming_the_file(component, how, dtype, tiny_base, tmp_path, cli):
    """torch: fp32 loads through diffusers/transformers, bf16 through pipeline.load_cast's own reader."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (f,) = (base / component).glob("*.safetensors")
    _damage_bytes(f, how)
    r = cli("generate", base, "--prompt", "a photo", "--steps", "1", "--dtype", dtype, "-o", tmp_path / "out")
    one_line(r, f)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rel", ["unet/config.json", "tokenizer/tokenizer_config.json", "vae/config.json"])
def test_a_damaged_base_config_is_one_line_naming_the_file(rel, tiny_base, tmp_path, cli):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    damage(base / rel, "json")
    r = cli("generate", base, "--prompt", "a photo", "--steps", "1", "--resolution", "64", "-o", tmp_path / "out")
    one_line(r, base / rel)
    assert not (tmp_path / "out").exists()


def _source(runtime, exports, tiny_base):
    return tiny_base if runtime == "torch" else exports / runtime


WRONG_KIND = [  # (runtimes, extra args after the source, the culprit named)
    (("onnx", "openvino"), ["--adapter", "{lora}"], "--adapter"),
    (("onnx", "openvino"), ["--base", "tiny"], "--base"),
    (("onnx", "openvino"), ["--dtype", "bf16"], "--dtype"),
    (("onnx",), ["--inference-precision", "bf16"], "--inference-precision"),
    (("torch",), ["--inference-precision", "fp32"], "--inference-precision"),
    (("torch", "onnx", "openvino"), ["--prompt", "a {token} dog"], "{token}"),
    (("torch", "onnx", "openvino"), ["--protocol"], "--protocol"),
    (("torch", "onnx", "openvino"), ["--prompts", "{src}"], "--prompts"),  # a folder for a file
]
WRONG = [(rt, i) for i, (rts, _, _) in enumerate(WRONG_KIND) for rt in rts]


@pytest.mark.parametrize("runtime,case", WRONG, ids=[f"{rt}-{' '.join(WRONG_KIND[i][1])}" for rt, i in WRONG])
def test_a_wrong_kind_of_flag_for_the_source_is_one_line(runtime, case, exports, tiny_base, lora_run, tmp_path, cli):
    if runtime in RUNTIME_EXTRAS:
        pytest.importorskip(RUNTIME_EXTRAS[runtime])
    src = _source(runtime, exports, tiny_base)
    _, extra, culprit = WRONG_KIND[case]
    extra = [str(lora_run) if a == "{lora}" else str(src) if a == "{src}" else a for a in extra]
    prompt = [] if "--prompt" in extra or "--protocol" in extra or "--prompts" in extra else ["--prompt", "x"]
    one_line(cli("generate", src, *prompt, *extra, "--steps", "1", "-o", tmp_path / "out"), culprit)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["a-coreml-export", "a-file", "an-export-as-adapter", "an-export-folder-as-prompts"])
def test_a_wrong_kind_of_source_is_one_line_naming_it(kind, exports, tmp_path, cli):
    pytest.importorskip("onnxruntime")
    if kind == "a-coreml-export":
        src = tmp_path / "coreml"
        src.mkdir()
        (src / "export.json").write_text(json.dumps({"format": "coreml", "resolution": 64, "base": "tiny"}))
        argv, culprit = [src], src
    elif kind == "a-file":
        src = tmp_path / "dog.safetensors"
        src.write_bytes(b"\x07" * 64)
        argv, culprit = [src], src
    elif kind == "an-export-as-adapter":
        argv, culprit = ["--base", "tiny", "--adapter", exports / "onnx"], exports / "onnx"
    else:
        argv, culprit = [exports / "onnx", "--prompts", exports / "onnx"], "--prompts"
    r = cli("generate", *argv, *([] if "--prompts" in argv else ["--prompt", "x"]), "-o", tmp_path / "out")
    one_line(r, culprit)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("runtime", ["torch", *_runtimes()])
def test_a_second_writer_of_one_output_folder_is_refused(runtime, exports, tiny_base, tmp_path, cli):
    from personalize.outputs import output_lock

    out = tmp_path / "out"
    with output_lock(out):
        r = cli("generate", _source(runtime, exports, tiny_base), *GEN, "-o", out)
    one_line(r, out, "is writing it")
    assert not out.exists() or not any(out.iterdir())
