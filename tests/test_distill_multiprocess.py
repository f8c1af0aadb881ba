"""`distill train` under a two-process launch (torchrun with gloo on CPU, what `accelerate launch`
sets up on a multi-GPU machine): every rank trains, rank 0 writes the student, all exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import write_photos

pytestmark = pytest.mark.slow  # two fresh interpreters importing torch + diffusers: ~25 s on 2 cores


def test_two_process_kd_run_trains_and_writes_the_student(tmp_path):
    from diffusers import StableDiffusionPipeline

    from distill.cli import main
    from personalize.backbones import build_tiny_components

    teacher = tmp_path / "teacher"
    StableDiffusionPipeline(**build_tiny_components(seed=0), requires_safety_checker=False).save_pretrained(
        teacher, safe_serialization=True)
    assert main(["prune", "--teacher", str(teacher), "--arch", "bk-small", "-o", str(tmp_path / "student")]) == 0
    data = write_photos(tmp_path / "data", n=8, size=(72, 80), seed=3)
    with (data / "metadata.jsonl").open("w") as f:
        for i, p in enumerate(sorted(data.glob("*.jpg"))):
            f.write(json.dumps({"file_name": p.name, "text": f"a photo of thing {i}"}) + "\n")

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "distill", "train", "--teacher", str(teacher), "--student", str(tmp_path / "student"),
           "--data", str(data), "-o", str(out), "--steps", "2", "--resolution", "64", "--batch-size", "2",
           "--gradient-accumulation-steps", "2", "--log-every", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "distill.json").read_text())
    assert meta["num_processes"] == 2 and len(meta["final_losses"]) == 4
    assert len((out / "logs" / "loss.csv").read_text().splitlines()) == 3
    pipe = StableDiffusionPipeline.from_pretrained(out / "student")
    assert pipe.unet.mid_block is None
