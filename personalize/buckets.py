"""Aspect-ratio buckets (`--buckets`): each photo is trained at the size of about resolution²
pixels whose aspect ratio is nearest its own, instead of a centre crop to a square (a 3:4 phone
photo loses a quarter of itself to a square crop). Never imports models.

The sizes follow kohya's sd-scripts (`make_bucket_resolutions`: for each width a multiple of
`BUCKET_STEP`, the largest height of that step within the area, both orientations) and NovelAI's
bucketing: sides multiples of 64 px (SD's U-Net downsamples latents 3 times, the VAE 8x), ratios
from 1:2 to 2:1; the height just above the area is kept too when it stays within `AREA_SLACK` of
it, which roughly halves the widest crop. The square bucket is always resolution x resolution, so
a square photo is cut exactly as without buckets. A photo goes to the bucket of nearest aspect
ratio (log scale: the one that crops the least of it), is scaled to cover it and centre-cropped:
the crop is at most about one bucket step (measured over ratios 1:2..2:1: <= 68 px at 512, <= 64
at 768, <= 46 at 1024; bucket_sizes' test holds it). Masks are cut with their photo's box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import mask_image, orphan_masks, open_image, to_tensor
from .errors import UserError

BUCKET_STEP = 64  # kohya's --bucket_reso_steps default and NovelAI's step
MAX_RATIO = 2.0  # 1:2 .. 2:1
AREA_SLACK = 0.1  # a bucket may exceed resolution² by this fraction (the height just above the area)


def bucket_sizes(resolution: int, step: int = BUCKET_STEP, max_ratio: float = MAX_RATIO) -> list[tuple[int, int]]:
    """Every (width, height) bucket for `resolution`, sorted."""
    area = resolution * resolution
    out = {(resolution, resolution)}
    for w in range(step, int(resolution * math.sqrt(max_ratio)) + step + 1, step):
        for h in (area // w // step * step, -(-area // w // step) * step):
            for bw, bh in ((w, h), (h, w)):
                if bh > 0 and 1 / max_ratio <= bw / bh <= max_ratio and bw * bh <= area * (1 + AREA_SLACK):
                    out.add((bw, bh))
    return sorted(out)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of nearest aspect ratio (log scale: the one that crops the least of the photo);
    of two with the same ratio, the smaller."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - r), 9), b[0] * b[1], b))


@dataclass(frozen=True)
class Placement:
    """Where a photo goes: its bucket (w, h), the size it is scaled to, and the crop box in it."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    box: tuple[int, int, int, int]  # left, top, right, bottom in the resized image

    def to_json(self) -> dict:
        return {"bucket": list(self.bucket), "resized": list(self.resized), "crop": list(self.box)}


def place(width: int, height: int, bucket: tuple[int, int]) -> Placement:
    """Scale (width, height) to cover `bucket` and centre-crop it (as `data.resize_center_crop`
    does for the square)."""
    bw, bh = bucket
    s = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * s)), max(bh, round(height * s))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return Placement(bucket, (rw, rh), (left, top, left + bw, top + bh))


def cut(img: Image.Image, at: Placement) -> Image.Image:
    return img.resize(at.resized, Image.Resampling.BICUBIC).crop(at.box)


def load_bucketed(paths: list[Path], resolution: int, allow_upscale: bool = False
                  ) -> tuple[list[torch.Tensor], list[Placement]]:
    """Every photo at its bucket: ((3, h, w) tensors in [-1, 1], placements), all validated first."""
    if not paths:
        raise UserError("no images to train on")
    buckets = bucket_sizes(resolution)
    images, placements = [], []
    for p in paths:
        img = open_image(p)
        at = place(*img.size, nearest_bucket(*img.size, buckets))
        if (at.bucket[0] > img.size[0] or at.bucket[1] > img.size[1]) and not allow_upscale:
            raise UserError(f"{p}: image is {img.size[0]}x{img.size[1]}, smaller than its bucket "
                            f"{at.bucket[0]}x{at.bucket[1]} (--buckets at --resolution {resolution}); lower "
                            f"--resolution or pass --allow-upscale")
        images.append(to_tensor(cut(img, at)))
        placements.append(at)
    return images, placements


def load_bucketed_masks(paths: list[Path], placements: list[Placement], alpha: bool = False
                        ) -> list[torch.Tensor] | None:
    """Each photo's loss mask (1, h, w) cut exactly like its photo; all ones for a photo without
    one; None when no photo has a mask (as `data.load_masks`)."""
    orphan_masks(paths)
    found = [mask_image(p, alpha) for p in paths]
    if all(m is None for m in found):
        return None
    out = []
    for m, at in zip(found, placements):
        w, h = at.bucket
        if m is None:
            out.append(torch.ones(1, h, w))
            continue
        m, name = m
        arr = np.asarray(cut(m, at), dtype=np.float32) / 255.0
        if not arr.any():  # as data.load_masks: a mask that trains on nothing is a mistake
            raise UserError(f"{name}: the mask is black in the part of the photo trained on (its bucket crop), "
                            f"so the photo would train on nothing; white is what is learned")
        out.append(torch.from_numpy(arr)[None])
    return out
