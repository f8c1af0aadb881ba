"""Shared fixtures. Everything runs offline on the in-code `tiny` backbone and synthetic photos.

The environment is set at import time, before huggingface_hub reads HF_HUB_OFFLINE into its
constants, and every test session gets its own personalize cache (tiny backbone, class images).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PERSONALIZE_OFFLINE"] = "1"  # never try to download the DreamBooth dataset in tests
os.environ["PERSONALIZE_CACHE"] = tempfile.mkdtemp(prefix="personalize-test-cache-")
os.environ.pop("PERSONALIZE_DATA", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "dreambooth" / "dataset"


def write_photos(folder: Path, n: int = 4, size=(80, 96), seed: int = 0) -> Path:
    """Small synthetic 'subject photos': a coloured blob on a textured background, so images differ."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = rng.integers(0, 80, (h, w, 3)).astype(np.float32)
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (min(h, w) // 4) ** 2
        base[blob] = rng.integers(120, 255, 3)
        Image.fromarray(base.astype(np.uint8)).save(folder / f"{i:02d}.jpg", quality=95)
    return folder


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    from personalize.backbones import materialize_tiny

    return materialize_tiny(0)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """A personalize cache of the test's own (class images, the tiny backbone), for tests that count
    what gets generated: the session cache holds whatever earlier tests left in it."""
    root = tmp_path / "personalize-cache"
    monkeypatch.setenv("PERSONALIZE_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos") / "my_dog")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A fake DreamBooth dataset/ folder with a few subjects (two dogs, a backpack)."""
    root = tmp_path_factory.mktemp("dataset")
    for i, name in enumerate(["dog", "dog2", "backpack"]):
        write_photos(root / name, n=3, seed=10 + i)
    return root


# the flags that make a tiny run take seconds
FAST = ["--base", "tiny", "--steps", "4", "--class-images", "2", "--class-image-steps", "2",
        "--validation-images", "1", "--validation-steps", "2", "--log-every", "2"]


def _train(tmp_path_factory, method: str, subject: Path, class_noun: str, *extra) -> Path:
    from personalize.cli import main

    out = tmp_path_factory.mktemp("runs") / method
    assert main([method, "--subject", str(subject), "--class-noun", class_noun, "--output-dir", str(out), *FAST,
                 *map(str, extra)]) == 0
    return out


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, photos) -> Path:
    """A finished LoRA run (dog, live subject) on `tiny`, with a learning rate that visibly moves it."""
    return _train(tmp_path_factory, "lora", photos, "dog", "--lr", "1e-2")


@pytest.fixture(scope="session")
def pivotal_run(tmp_path_factory, photos) -> Path:
    """A finished LoRA run with --pivotal (new tokens <s0><s1>, trained in steps 1-2 of 4), in fp32
    so that its in-memory validation image can be reproduced bit for bit from the run dir."""
    return _train(tmp_path_factory, "lora", photos, "dog", "--lr", "1e-2", "--pivotal", "--ti-lr", "1e-2",
                  "--class-images", "0", "--mixed-precision", "no")


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, photos) -> Path:
    return _train(tmp_path_factory, "full", photos, "dog", "--lr", "1e-3")


@pytest.fixture(scope="session")
def lora_run_object(tmp_path_factory) -> Path:
    """A second LoRA run on `tiny`: another subject (an object), token and seed."""
    photos = write_photos(tmp_path_factory.mktemp("photos") / "my_backpack", seed=3)
    return _train(tmp_path_factory, "lora", photos, "backpack", "--lr", "1e-2", "--token", "zwx", "--seed", "7",
                  "--class-images", "0", "--validation-images", "0")


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run `personalize ...` in-process; returns exit code and captured output."""
    from personalize.cli import main

    def run(*args) -> CliResult:
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


def kill_after_checkpoint(monkeypatch, step: int):
    """The next run raises KeyboardInterrupt right after writing the checkpoint of `step`, as a run
    killed there; returns the call that makes runs whole again (before `--resume`)."""
    import personalize.checkpoints as ckpt

    real = ckpt.save_checkpoint

    def save_then_die(run_dir, at, *a, **k):
        real(run_dir, at, *a, **k)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(ckpt, "save_checkpoint", real)
