"""Every bad input of `personalize lora/full`: one line naming the culprit, exit 2, no traceback,
nothing written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, write_photos


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no photos here")
    write_photos(root / "corrupt", n=2)
    (root / "corrupt" / "02.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    write_photos(root / "small", n=2, size=(40, 40))
    write_photos(root / "truncated", n=2)
    data = (root / "truncated" / "01.jpg").read_bytes()
    (root / "truncated" / "01.jpg").write_bytes(data[: len(data) // 2])
    return root


CASES = [
    # (id, argv builder, expected fragment of the message)
    ("unknown-subject", lambda r, ds: ["lora", "--subject", "dgo", "--data-dir", ds], "did you mean dog"),
    ("unknown-base", lambda r, ds: ["lora", "--subject", "dog", "--data-dir", ds, "--base", "bk-sdm-huge"],
     "unknown base 'bk-sdm-huge'"),
    ("missing-data-dir", lambda r, ds: ["lora", "--subject", "dog", "--data-dir", r / "nowhere"],
     "does not exist"),
    ("no-images", lambda r, ds: ["lora", "--subject", r / "empty", "--class-noun", "dog"], "no images"),
    ("corrupt-image", lambda r, ds: ["lora", "--subject", r / "corrupt", "--class-noun", "dog"],
     "02.jpg: unreadable or corrupt"),
    ("truncated-image", lambda r, ds: ["lora", "--subject", r / "truncated", "--class-noun", "dog"],
     "01.jpg: unreadable or corrupt"),
    ("too-small", lambda r, ds: ["lora", "--subject", r / "small", "--class-noun", "dog", "--resolution", "64"],
     "smaller than --resolution 64"),
    ("own-photos-need-class", lambda r, ds: ["lora", "--subject", r / "small"], "--class-noun"),
    ("zero-steps", lambda r, ds: ["lora", "--subject", "dog", "--data-dir", ds, "--steps", "0"],
     "--steps must be positive"),
    ("negative-rank", lambda r, ds: ["lora", "--subject", "dog", "--data-dir", ds, "--rank", "-4"],
     "--rank must be positive"),
    ("resolution-not-8", lambda r, ds: ["full", "--subject", "dog", "--data-dir", ds, "--resolution", "100"],
     "multiple of 8"),
    ("offline-hub-base", lambda r, ds: ["lora", "--subject", "dog", "--data-dir", ds, "--base", "bk-sdm-small"],
     "nota-ai/bk-sdm-small"),
    ("base-not-a-pipeline", lambda r, ds: ["lora", "--subject", "dog", "--data-dir", ds, "--base", r / "empty"],
     "not a diffusers pipeline directory"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, bad_folders, dataset, tmp_path, cli):
    _, argv, fragment = case
    out = tmp_path / "run"
    cmd, *rest = argv(bad_folders, dataset)
    r = cli(cmd, *FAST, *rest, "--output-dir", out)  # a case's own --base comes last and wins
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert fragment in lines[0]
    assert "Traceback" not in r.err
    assert not out.exists()


def test_offline_base_message_names_hub_id_cache_and_fix(dataset, tmp_path, cli):
    r = cli("lora", "--subject", "dog", "--data-dir", dataset, "--base", "bk-sdm-base", "--output-dir", tmp_path / "x")
    msg = r.err.strip()
    assert "nota-ai/bk-sdm-base" in msg and "HF cache" in msg and "--base /path/to/pipeline_dir" in msg


def test_missing_default_dataset_offline_says_where(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)  # the default ./data/dreambooth/dataset is absent here
    r = cli("lora", "--subject", "dog", *FAST)  # a base that is there: the dataset is what is missing
    assert r.code == 2 and "data/dreambooth/dataset" in r.err and "clone" in r.err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_console_script_prints_no_traceback(tmp_path):
    """The real entry point (not just main()) keeps errors to one line."""
    r = subprocess.run([sys.executable, "-m", "personalize", "lora", "--subject", "cat", "--data-dir",
                        str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("mode", ["RGBA", *(pytest.param(m, marks=pytest.mark.slow) for m in ("P", "L", "CMYK", "I;16"))])
def test_odd_image_modes_are_converted_and_train(mode, tmp_path, cli):
    folder = tmp_path / "odd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        rgb = Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8))
        if mode == "I;16":
            img = Image.fromarray((rng.integers(0, 65535, (72, 72))).astype(np.uint16))
            img.save(folder / f"{i}.png")
        elif mode == "CMYK":
            rgb.convert("CMYK").save(folder / f"{i}.jpg")
        else:
            rgb.convert(mode).save(folder / f"{i}.png")
    r = cli("lora", "--subject", folder, "--class-noun", "toy", *FAST, "--steps", "1", "--class-images", "0",
            "--validation-images", "0", "--output-dir", tmp_path / "run")
    assert r.code == 0, r.err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("verbose", [False, True])
def test_library_notices_stay_off_the_console_unless_verbose(verbose):
    """transformers >= 5.25 pulls `kernels`; bitsandbytes asks it for a CPU hub kernel at import and,
    offline, both log a notice before anything of ours. A user sees them only with -v."""
    code = (f"from personalize.cli import quiet_libraries; quiet_libraries(verbose={verbose})\n"
            "import logging\n"
            "logging.getLogger('kernels._internals.hf_hub').warning('kernels notice')\n"
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('bitsandbytes notice')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shown = [ln for ln in r.stderr.splitlines() if "notice" in ln]
    assert shown == (["kernels notice", "bitsandbytes notice"] if verbose else [])


def test_verbose_is_a_flag_of_both_clis():
    from distill.cli import build_parser as distill_parser
    from personalize.cli import build_parser

    assert build_parser().parse_args(["-v", "env"]).verbose
    assert distill_parser().parse_args(["--verbose", "report", "x", "-o", "y"]).verbose
