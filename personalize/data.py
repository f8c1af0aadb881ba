"""Photos in, tensors out: loading, validating and normalising subject and class images.

Never imports models. Every failure is a one-line UserError that names the file.
Transforms follow the diffusers DreamBooth scripts (resize shorter side, center crop, [-1, 1]),
done with PIL + numpy + torch (no torchvision).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white (a transparent product shot
    must not become a black square); 16-bit greyscale is rescaled, not clipped."""
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.float32)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, rgba)
    return img.convert("RGB")


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image (truncated files fail here, not mid-training), honouring
    EXIF orientation (phone photos)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable or corrupt image ({type(e).__name__})") from None


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_training_images(paths: list[Path], resolution: int, allow_upscale: bool = False) -> torch.Tensor:
    """Load every photo (all validated before anything is written) -> (N, 3, R, R) in [-1, 1]."""
    if not paths:
        raise UserError("no images to train on")
    out = []
    for p in paths:
        img = open_image(p)
        if min(img.size) < resolution and not allow_upscale:
            raise UserError(f"{p}: image is {img.size[0]}x{img.size[1]}, smaller than --resolution {resolution}; "
                            f"lower --resolution or pass --allow-upscale")
        out.append(to_tensor(resize_center_crop(img, resolution)))
    return torch.stack(out)


def with_flips(images: torch.Tensor) -> torch.Tensor:
    """Horizontal-flip augmentation, materialised once so latents can be cached for both views."""
    return torch.cat([images, images.flip(-1)])


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or min(len(images), 4)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
