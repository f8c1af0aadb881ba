"""`distill eval`'s scoring inputs, checked before the first image is drawn: the real-image FID
statistics (`--real-stats`, BK-SDM's file beside the COCO prompts, or computed from
`--real-images` and cached), the FID Inception (loaded and run once) and the CLIP evaluator's
files. Missing, damaged or wrong-kind inputs are one line naming the flag and the file; a damaged
statistics cache is computed again. Also the image reading of the scoring step."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from personalize.backbones import cache_root
from personalize.errors import UserError, one_line, warn

from .coco import coco_candidates

REAL_STATS_NAME = "real_im256.npz"  # BK-SDM's data/mscoco_val2014_41k_full/real_im256.npz
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
FID_NEEDS = "FID needs at least 2 generated and 2 real images (a covariance of one sample is undefined)"


def real_stats_path(cfg) -> Path | None:
    """--real-stats, else BK-SDM's real_im256.npz beside the COCO files; None with --real-images."""
    if cfg.real_images:
        return None
    if cfg.real_stats:
        return Path(cfg.real_stats).expanduser()
    for c in coco_candidates():
        for d in (c.parent, c.parent.parent / "mscoco_val2014_41k_full"):
            if (d / REAL_STATS_NAME).is_file():
                return d / REAL_STATS_NAME
    raise UserError(f"no real-image FID statistics: pass --real-stats FILE.npz (BK-SDM's {REAL_STATS_NAME}, from "
                    f"scripts/get_mscoco_files.sh) or --real-images DIR (statistics computed once and cached)")


def _score_device(cfg) -> str:
    import torch

    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def preflight(cfg, main: bool = True, log=print) -> dict:
    """Everything scoring needs, on the main process before generation: missing, damaged or
    wrong-kind inputs are one line now, not after the last image. The Inception is loaded (and run
    once), the real statistics read and matched to it, or computed from --real-images (cached)."""
    if not (cfg.score and main):
        return {}
    from personalize.evaluation import fid as F
    from personalize.evaluation.inception import HOW_TO_GET, default_path, load_inception

    stats, real = real_stats_path(cfg), None
    if stats is not None:
        mu, sigma = F.load_stats(stats)  # missing/malformed/non-finite: one line, now
    else:
        real = Path(cfg.real_images).expanduser()
        if not real.is_dir() or not _image_files(real):
            raise UserError(f"--real-images {cfg.real_images}: no such folder or no images in it")
        if len(_image_files(real)) < 2:
            raise UserError(f"--real-images {cfg.real_images}: 1 image; {FID_NEEDS}")
    inc = Path(cfg.inception).expanduser() if cfg.inception else default_path()
    if not inc.is_file():
        raise UserError(f"FID Inception {inc}: no such file; {HOW_TO_GET}")
    if cfg.clip.lower() != "none":
        from personalize.evaluation.evaluators import resolve_model

        check_model_files(resolve_model(cfg.clip, what="CLIP", flag="--clip", needs=()).path, f"--clip {cfg.clip}")
    device = _score_device(cfg)
    net = load_inception(cfg.inception or None, cfg.allow_pickle, device=device)  # damaged / not one: one line
    if real is None:
        if mu.numel() != net.dim:
            raise UserError(f"--real-stats {stats}: {mu.numel()}-d statistics, but the FID Inception ({net.name}) "
                            f"gives {net.dim}-d features; use statistics made with the same Inception")
        src = str(stats)
    else:
        mu, sigma, cached = real_images_stats(real, net, cfg.generation.resize, cfg.score_batch_size, log)
        src = f"{real} (stats {cached})"
    return {"inception": net, "real": (mu, sigma, src), "device": device}


def check_model_files(d: Path, what: str) -> None:
    """An evaluator folder's JSON configs parse and its safetensors headers cover their files (a
    cheap read of a few kB each), so a damaged CLIP is one line now, not after the last image."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(d.glob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{what}: {f.name} is damaged ({one_line(e)})") from None
    for f in sorted(d.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise UserError(f"{what}: {f.name} is damaged ({one_line(e)})") from None


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _load_uint8(paths: list[Path], size: int | None = None, flag: str = ""):
    """uint8 [n, 3, H, W] of image files; one that does not decode is a one-line UserError naming
    it (`flag`: the option it came from; none: a generated image, which a rerun draws again)."""
    import numpy as np
    import torch
    from PIL import Image

    arrs = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size and im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                arrs.append(np.asarray(im))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            fix = "" if flag else "; run `distill eval` without --no-generate to draw it again"
            raise UserError(f"{flag + ' ' if flag else ''}{p}: unreadable image ({one_line(e)}){fix}") from None
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def inception_outputs(net, paths: list[Path], batch_size: int, size: int | None = None, flag: str = ""):
    """(pool [n, d], logits [n, c] or None) of image files, read one batch at a time."""
    import torch

    pools, logits = [], []
    for i in range(0, len(paths), batch_size):
        o = net(_load_uint8(paths[i:i + batch_size], size, flag))
        pools.append(o["pool"])
        if o["logits"] is not None:
            logits.append(o["logits"])
    return torch.cat(pools), (torch.cat(logits) if logits else None)


def real_images_stats(d: Path, net, size: int, batch_size: int, log=print):
    """FID statistics of a real-image folder, resized to `size` x `size` (BK-SDM squashes val2014
    to 256x256); cached by (file names, sizes, mtimes, Inception, size)."""
    from personalize.evaluation import fid as F

    files = _image_files(d)
    h = hashlib.sha1(f"{net.name}|{size}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cached = cache_root() / "fid_stats" / f"{h.hexdigest()[:20]}.npz"
    if cached.is_file():
        try:
            mu, sigma = F.load_stats(cached, flag="cached statistics")
            log(f"real-image statistics from the cache ({cached})")
            return mu, sigma, cached
        except UserError as e:  # a damaged cache is computed again, never trusted
            warn(cached, f"damaged FID statistics cache ({str(e).split(': ', 1)[-1]}); computing it again")
    log(f"computing FID statistics of {len(files)} real images in {d} (once; cached)")
    pool, _ = inception_outputs(net, files, batch_size, size, flag="--real-images")
    mu, sigma = F.feature_stats(pool)
    F.save_stats(cached, mu, sigma)
    return mu, sigma, cached
