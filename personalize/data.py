"""Photos in, tensors out: loading, validating and normalising subject and class images.

Never imports models. Every failure is a one-line UserError that names the file.
Transforms follow the diffusers DreamBooth scripts (resize shorter side, center crop, [-1, 1]),
done with PIL + numpy + torch (no torchvision).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .subjects import IMAGE_SUFFIXES, list_images, read_prompts_text

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on `background` (white for photos: a
    transparent product shot must not become a black square); 16-bit greyscale is rescaled, not
    clipped (32-bit `I` by its own range: 16-bit data, or 8-bit data widened)."""
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        arr = np.asarray(img).astype(np.float32)
        peak = 65535.0 if img.mode in _SIXTEEN_BIT or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        img = Image.alpha_composite(canvas, rgba)
    return img.convert("RGB")


def upright_rgb(img: Image.Image) -> Image.Image:
    """An opened image fully decoded (truncated data fails here, not mid-training), turned upright
    by its EXIF orientation (phone photos), as 8-bit RGB with transparency on white (`to_rgb`).
    The one decoding of every training image."""
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


def _decoded(path: Path, what: str, convert=upright_rgb) -> Image.Image:
    """`convert` of the image file `path` (opened, decoded), or a one-line UserError naming it: not
    an image, damaged or truncated, or more pixels than PIL decodes safely (a decompression bomb: a
    small file claiming a huge image). Below that limit a big photo decodes without PIL's warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the error below is the limit
            with Image.open(path) as im:
                return convert(im)
    except Image.DecompressionBombError as e:
        n = re.findall(r"\((\d+) pixels\)|limit of (\d+) pixels", str(e))
        size = f"{n[0][0]} pixels, more than the {n[1][1]} " if len(n) == 2 else "more pixels than the "
        raise UserError(f"{path}: {size}PIL decodes safely (a decompression bomb, or far "
                        f"too large to train on); downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable or corrupt {what} ({type(e).__name__})") from None


def open_image(path: Path) -> Image.Image:
    """Open and decode an image file with `upright_rgb`; a one-line UserError naming it if it cannot be."""
    return _decoded(Path(path), "image")


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


# ---------------------------------------------------------------------------- captions
CAPTION_SUFFIX = ".txt"  # kohya's caption_extension default for DreamBooth-style folders
METADATA_JSONL = "metadata.jsonl"  # Hugging Face `imagefolder`: one {"file_name": ..., "text": ...} a line
MASK_SUFFIX = ".mask.png"


MAX_CAPTION_BYTES = 1 << 16  # a caption is a sentence (CLIP reads 77 tokens): a bigger .txt is another file
MAX_METADATA_BYTES = 64 << 20  # a line per photo


def read_captions(paths: list[Path]) -> list[str | None]:
    """Each photo's caption template: `photo.txt` beside `photo.jpg`, else its line of the folder's
    `metadata.jsonl` (`file_name` + `text`, the HF imagefolder layout), else None (the run's
    instance prompt). `{token}` / `{class}` are filled by the caller. Both are UTF-8 (a BOM is
    dropped); what would be silently unused is refused, naming it: a metadata line for no photo of
    the folder, a `.txt` with the name of a file that is not a photo read here, or, once photos
    have `.txt` captions, one with no photo's name."""
    by_name: dict[Path, dict[str, str]] = {}
    out = []
    for p in paths:
        side = p.with_suffix(CAPTION_SUFFIX)
        folder = p.parent
        if folder not in by_name:
            by_name[folder] = _read_metadata(folder)
            _orphan_captions(folder)
        if side.exists() or side.is_symlink():
            out.append(_caption_text(read_prompts_text(side, "caption", MAX_CAPTION_BYTES, "a caption"), side))
            continue
        text = by_name[folder].get(p.name)
        out.append(None if text is None else _caption_text(text, folder / METADATA_JSONL))
    return out


def _read_metadata(folder: Path) -> dict[str, str]:
    """file name -> caption of the folder's metadata.jsonl ({} without one)."""
    import json

    meta = folder / METADATA_JSONL
    if not (meta.exists() or meta.is_symlink()):
        return {}
    names = {p.name for p in list_images(folder)}
    rows: dict[str, str] = {}
    first: dict[str, int] = {}
    text = read_prompts_text(meta, "captions", MAX_METADATA_BYTES, "a metadata.jsonl")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, caption = row["file_name"], row["text"]
            if not (isinstance(name, str) and isinstance(caption, str)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{meta}:{i}: not a JSON object with file_name and text (strings)") from None
        if name not in names:
            raise UserError(f"{meta}:{i}: {name} is not a photo in {folder} (its file_name is the photo's name there)")
        if name in first:
            raise UserError(f"{meta}:{i}: {name} captioned twice (first on line {first[name]})")
        first[name], rows[name] = i, caption
    return rows


def _orphan_captions(folder: Path) -> None:
    photos = list_images(folder)
    stems = {p.stem for p in photos}
    captioned = any(p.with_suffix(CAPTION_SUFFIX).exists() for p in photos)
    for t in sorted(folder.glob("*" + CAPTION_SUFFIX)):
        if t.stem in stems:
            continue
        other = sorted(f.name for f in folder.iterdir() if f.stem == t.stem and f != t and f.is_file())
        if other:
            raise UserError(f"{t}: the caption of {other[0]}, which is not a photo read here (a photo is one of "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        if captioned:
            raise UserError(f"{t}: the caption of no photo here (a photo's caption is <photo stem>{CAPTION_SUFFIX} "
                            f"beside it)")


def _caption_text(text: str, where: Path) -> str:
    text = " ".join(text.split())
    if not text:
        raise UserError(f"{where}: empty caption")
    return text


# ---------------------------------------------------------------------------- masks
def mask_path(photo: Path) -> Path:
    """`photo.jpg` -> `photo.mask.png` beside it."""
    return photo.with_name(photo.stem + MASK_SUFFIX)


def _as_mask(img: Image.Image) -> Image.Image:
    """A decoded mask file as 8-bit L, whatever its mode: the luminance of the image as drawn over
    black (a palette expanded first, so index 1 = white is white; 16-bit rescaled; a transparent
    part of an RGBA mask is not painted, so weighs 0)."""
    img.load()
    return to_rgb(ImageOps.exif_transpose(img), background=BLACK).convert("L")


def mask_image(photo: Path, alpha: bool) -> tuple[Image.Image, str] | None:
    """(the photo's mask as 8-bit L at the photo's (EXIF-upright) size, what it is called in a
    refusal): its mask file (`_as_mask`), else with `alpha` its alpha channel, else None."""
    mp = mask_path(photo)
    if mp.exists() and not mp.is_file():
        raise UserError(f"{mp}: not a file (a photo's mask is a PNG beside it)")
    if mp.is_file():
        m = _decoded(mp, "mask", _as_mask)
        with Image.open(photo) as ph:
            size = ImageOps.exif_transpose(ph).size
        if m.size != size:
            raise UserError(f"{mp}: mask is {m.size[0]}x{m.size[1]}, its photo {size[0]}x{size[1]}; "
                            f"a mask must match its photo's size")
        return m, str(mp)
    if alpha:
        with Image.open(photo) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode == "P":
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "PA"):
                return im.getchannel("A"), f"{photo}: its alpha channel (--alpha-mask)"
    return None


def orphan_masks(paths: list[Path]) -> None:
    """A `*.mask.png` in a photo folder that is no photo's mask (its photo renamed, deleted, or in a
    format not read; a case that differs) would be silently unused: refused, naming it."""
    for folder in dict.fromkeys(p.parent for p in paths):
        mine = {mask_path(p) for p in list_images(folder)}
        for f in sorted(folder.iterdir()):
            if f.name.lower().endswith(MASK_SUFFIX) and f not in mine:
                raise UserError(f"{f}: the mask of no photo here (a photo's mask is named <photo name>{MASK_SUFFIX} "
                                f"beside it: {mask_path(paths[0]).name} for {paths[0].name})")


def load_masks(paths: list[Path], resolution: int, alpha: bool = False) -> torch.Tensor | None:
    """(N, 1, R, R) loss masks in [0, 1] (white = learn), cropped like their photos; photos without
    one get all ones; None when no photo has a mask (the loss is then exactly the unmasked one). A
    mask that is black everywhere the photo is trained on (it trains on nothing: certainly a
    mistake) is refused in one line naming it, as is a mask file that is no photo's."""
    orphan_masks(paths)
    found = [mask_image(p, alpha) for p in paths]
    if all(m is None for m in found):
        return None
    out = []
    for m in found:
        if m is None:
            out.append(torch.ones(1, resolution, resolution))
            continue
        m, name = m
        arr = np.asarray(resize_center_crop(m, resolution), dtype=np.float32) / 255.0
        if not arr.any():
            where = ("everywhere" if not np.asarray(m).any() else
                     f"in the part of the photo trained on (its centre crop at --resolution {resolution})")
            raise UserError(f"{name}: the mask is black {where}, so the photo would train on nothing; "
                            f"white is what is learned")
        out.append(torch.from_numpy(arr)[None])
    return torch.stack(out)


def latent_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks at the VAE latent resolution `size` (area average over each patch one latent covers,
    as kohya's `interpolate(mode="area")`)."""
    import torch.nn.functional as F

    return F.interpolate(masks, size=tuple(size), mode="area")
