"""`personalize generate EXPORT_DIR --inference-precision fp32|bf16` on an OpenVINO export.

bf16 compute rounds every activation to 8 mantissa bits (relative error ~2^-9 per op), so over a
3-step tiny pipeline the images move by a few uint8 levels: they must differ from the fp32 ones
(otherwise the hint did not take) yet stay within a mean of 3 levels (the int8 export's bound,
test_export_openvino.py) and a max of 16 (measured: mean 0.75, max 6; a random-weight model can
amplify rounding more than a trained one, so some headroom). The reuse key carries the precision, so the two never replace each other.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _export_helpers import pixels

pytest.importorskip("openvino")

GEN = ["--prompt", "a {token} {class} in the snow", "--steps", "3", "-n", "1", "--seed", "3"]
MEAN_TOL, MAX_TOL = 3.0, 16  # measured here: mean 0.75, max 6 levels


def settings(folder):
    return {p.with_suffix(".png").name: json.loads(p.read_text())["settings"] for p in sorted(folder.glob("p*.json"))}


@pytest.fixture(scope="module")
def ov_export(lora_run, tmp_path_factory):
    from personalize.cli import main

    out = tmp_path_factory.mktemp("ovbf16") / "ov"
    assert main(["export", str(lora_run), "--format", "openvino", "-o", str(out)]) == 0
    return out


def test_bf16_close_to_fp32_and_keyed_apart(ov_export, tmp_path, cli):
    from personalize.precision import cpu_bf16_is_native

    if not cpu_bf16_is_native():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX)")
    out = tmp_path / "g"
    assert cli("generate", ov_export, *GEN, "-o", out).code == 0
    f32, f32_settings = pixels(out), settings(out)
    r = cli("generate", ov_export, *GEN, "--inference-precision", "bf16", "-o", out)
    assert r.code == 0, r.err
    assert "already there" not in r.out  # fp32 images are not reused for bf16
    bf16, bf16_settings = pixels(out), settings(out)
    assert f32.keys() == bf16.keys() and f32
    for k in f32:
        diff = np.abs(bf16[k] - f32[k])
        assert 0 < diff.mean() < MEAN_TOL and diff.max() <= MAX_TOL, (diff.mean(), diff.max())
        a, b = f32_settings[k], bf16_settings[k]
        assert (a["export"]["inference_precision"], b["export"]["inference_precision"]) == ("fp32", "bf16")
        assert {x: y for x, y in a.items() if x != "export"} == {x: y for x, y in b.items() if x != "export"}
    r = cli("generate", ov_export, *GEN, "--inference-precision", "bf16", "-o", out)
    assert r.code == 0 and "already there" in r.out  # same precision: reused


@pytest.mark.parametrize("case", ["torch_run", "onnx_export", "no_native_bf16"])
def test_bad_combinations_are_one_line(case, ov_export, lora_run, tmp_path, cli, monkeypatch):
    src, prec = ov_export, "bf16"
    if case == "torch_run":
        src = lora_run
    elif case == "onnx_export":
        # only export.json decides the runtime before anything loads: an ONNX record is enough
        src = tmp_path / "onnx"
        src.mkdir()
        rec = json.loads((ov_export / "export.json").read_text()) | {"format": "onnx", "runtime": "onnx"}
        (src / "export.json").write_text(json.dumps(rec))
        prec = "fp32"
    else:
        monkeypatch.setattr("personalize.precision.cpu_bf16_is_native", lambda: False)
    out = tmp_path / "out"
    r = cli("generate", src, *GEN, "--inference-precision", prec, "-o", out)
    assert r.code == 2
    assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, r.err
    assert "--inference-precision" in r.err
    assert not out.exists()
