"""Image cells -> tensors for BK-SDM distillation.

Decoding is personalize's (`personalize.data.upright_rgb`, as for DreamBooth photos): fully
decoded (truncated data fails here, not later), EXIF orientation applied, transparency composited
on white (LAION has both phone photos and transparent product shots). A cell that does not decode
is a `BadImage`, which the batchers skip and count.

Preprocessing is the BK-SDM recipe's (``kd_train.sh``: ``--resolution 512 --center_crop
--random_flip``): shorter side resized to the resolution (bilinear), center (or random) crop,
random horizontal flip, pixels scaled to [-1, 1]. PIL + numpy only, no model imports here.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from personalize.data import upright_rgb
from personalize.errors import one_line


def image_file_problem(path: str) -> str | None:
    """Why the image file at `path` cannot be trained on, or None. `verify` checks the header and
    structure; a reopened, fully decoded image (JPEGs in draft mode, 1/8 scale: every byte is still
    read) catches truncated data."""
    try:
        if not os.path.exists(path):
            return "no such file"
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except UnidentifiedImageError:
        return "not a readable image"
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, decompression bomb, unreadable: all unusable
        return "truncated" if "truncated" in str(e).lower() else one_line(e)
    return None


class BadImage(Exception):
    """An example whose image cannot be decoded; ``str()`` names it and why, in one line."""


def decode_image(image):
    """An image cell (PIL image, ``{"bytes", "path"}`` dict, bytes, path, array) -> upright RGB PIL
    image (`upright_rgb`); BadImage (naming the file where known) when it cannot be."""
    name = None
    try:
        if isinstance(image, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
            name = image.get("path")
            image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
        if isinstance(image, (bytes, bytearray)):
            if not image:
                raise BadImage(f"{name + ': ' if name else ''}empty image data")
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, str):
            name = image
            image = Image.open(image)
        elif image is None:
            raise BadImage("no image in the row")
        elif not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return upright_rgb(image)
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - whatever PIL raises for bad bytes, it is bad data
        raise BadImage(f"{name + ': ' if name else ''}{one_line(e)}") from None


def preprocess_image(image, resolution: int, center_crop: bool, flip: bool, crop_seed: int) -> torch.Tensor:
    """Image cell -> float32 CHW tensor in [-1, 1], BK-SDM recipe transforms (see module doc).
    Raises BadImage for an image that cannot be decoded."""
    image = decode_image(image)
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        r = random.Random(crop_seed)
        left, top = r.randint(0, nw - resolution), r.randint(0, nh - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
