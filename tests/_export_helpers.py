"""Readers shared by the deploy-export tests (ONNX, OpenVINO): the files an export wrote and the
pixels `personalize generate` drew."""

from __future__ import annotations

import numpy as np
from PIL import Image


def files(root):
    """Every file below `root`, as relative path strings."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def pixels(folder):
    """name -> RGB pixels (int) of the generated images p*.png in `folder`."""
    return {p.name: np.asarray(Image.open(p).convert("RGB")).astype(int) for p in sorted(folder.glob("p*.png"))}
