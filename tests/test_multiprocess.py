"""`personalize lora` under a two-process launch (torchrun with gloo on CPU: what `accelerate
launch` sets up on a multi-GPU machine): both ranks share the class-image generation, train
data-parallel, rank 0 writes the run, every process exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import write_photos

pytestmark = pytest.mark.slow  # two fresh interpreters importing torch + diffusers: ~30 s on 2 cores


def test_two_process_lora_run(tmp_path, tiny_base):
    photos = write_photos(tmp_path / "photos", n=3)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "personalize", "lora", "--subject", str(photos), "--class-noun", "dog", "--base", str(tiny_base),
           "--steps", "3", "--class-images", "3", "--class-image-steps", "2", "--validation-images", "1",
           "--validation-steps", "2", "--log-every", "1", "--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PERSONALIZE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "finished" and meta["class_images"]["count"] == 3
    # rank 0 generated the even indices, rank 1 the odd ones: no double work
    assert meta["class_images"]["generated_now"] == 2
    assert len(list((tmp_path / "cache" / "class_images").rglob("*.png"))) == 3
    assert len((out / "logs" / "loss.csv").read_text().splitlines()) == 4
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "checkpoints").exists()
