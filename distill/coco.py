"""The zero-shot MS-COCO benchmark of BK-SDM (Kim et al. 2023, Sec. 4): prompts and generation.

Protocol (BK-SDM ``src/generate.py`` defaults): the 30K captions of MS-COCO val2014 in their
``metadata.csv`` (``file_name,text``), one image per caption at 512 px, PNDM (the pipelines' own
scheduler), 25 steps, guidance 7.5; each image is also written downsampled to 256x256 (bicubic,
as their ``change_img_size``) for FID/IS/CLIP score.

Unlike BK-SDM's one sequential generator, prompt i always uses seed ``seed + i`` with its own
generator: any subset (``--limit N`` = the first N) and any batch size or process count give the
same image for the same prompt.

Resume and sharding: an image is done when its 256 px file exists (written last, atomically);
process r of w (``accelerate launch``) takes prompts ``r::w`` of those, so no image is made twice
and the shards' union is exactly one process's output.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from personalize.backbones import cache_root
from personalize.defaults import SCHEDULERS
from personalize.errors import UserError
from personalize.fileio import write_atomic
from personalize.subjects import read_prompts_file, read_prompts_text

COCO30K = "coco30k"
COCO_ENV = "PERSONALIZE_COCO"  # folder holding metadata.csv (and real_im256.npz), BK-SDM's layout
COCO_HOW = ("get BK-SDM's files with its scripts/get_mscoco_files.sh (data/mscoco_val2014_30k/metadata.csv and "
            "data/mscoco_val2014_41k_full/real_im256.npz) and pass --prompts PATH/metadata.csv, or set "
            f"${COCO_ENV} to their folder")
IMAGES_DIR = "images"
MAX_PROMPTS_BYTES = 64 << 20


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the prompts file: the seed offset
    file_name: str
    text: str


def coco_candidates() -> list[Path]:
    out = []
    if os.environ.get(COCO_ENV):
        d = Path(os.environ[COCO_ENV]).expanduser()
        out += [d / "metadata.csv", d / "mscoco_val2014_30k" / "metadata.csv"]
    out += [cache_root() / "mscoco_val2014_30k" / "metadata.csv", Path("data/mscoco_val2014_30k/metadata.csv")]
    return out


def _safe_name(name: str, where: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise UserError(f"{where}: file name {name!r} is not a plain file name")
    return name


def read_prompts(spec: str, limit: int | None = None) -> list[Prompt]:
    """The benchmark prompts: ``coco30k`` (BK-SDM's metadata.csv, looked up as `coco_candidates`),
    a ``.csv`` with a header and ``file_name,text`` columns, or a text file with one prompt a line
    (images named ``00000.jpg``...). `limit`: the first N."""
    if spec == COCO30K:
        path = next((p for p in coco_candidates() if p.is_file()), None)
        if path is None:
            raise UserError(f"--prompts coco30k: no metadata.csv in {', '.join(map(str, coco_candidates()))}; {COCO_HOW}")
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"--prompts {spec}: no such file (a metadata.csv with file_name,text or a text file "
                            f"with one prompt a line; or `coco30k`: {COCO_HOW})")
    out: list[Prompt] = []
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(read_prompts_text(path, "--prompts", MAX_PROMPTS_BYTES))))
        if not rows or len(rows[0]) < 2:
            raise UserError(f"--prompts {path}: expected a header and file_name,text columns (BK-SDM's metadata.csv)")
        for i, row in enumerate(r for r in rows[1:] if r):
            if len(row) < 2:
                raise UserError(f"--prompts {path}: row {i + 2} has {len(row)} column(s), expected file_name,text")
            out.append(Prompt(i, _safe_name(row[0].strip(), f"--prompts {path} row {i + 2}"), row[1]))
    else:
        # no `#` comments: line i is prompt i (its seed and file name), as in BK-SDM's text files
        lines = read_prompts_file(path, "--prompts", MAX_PROMPTS_BYTES, comments=False)
        out = [Prompt(i, f"{i:05d}.jpg", t) for i, t in enumerate(lines)]
    if not out:
        raise UserError(f"--prompts {path}: no prompts")
    names = [p.file_name for p in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"--prompts {path}: file name {dup} appears twice")
    return out[:limit] if limit else out


@dataclass
class GenerationConfig:
    """What decides the images (recorded in ``generation.json``; a rerun into the same folder
    with other values is refused, so one folder never mixes two protocols)."""

    steps: int = field(default=25, metadata={  # generate.py --num_inference_steps 25
        "help": "denoising steps (default %(default)s, BK-SDM generate.py)"})
    guidance_scale: float = field(default=7.5, metadata={  # StableDiffusionPipeline's default, kept by generate.py
        "help": "classifier-free guidance (default %(default)s)"})
    resolution: int = field(default=512, metadata={  # generate.py --img_sz 512
        "help": "generated image size (default %(default)s)"})
    resize: int = field(default=256, metadata={  # generate.py --img_resz 256: FID/IS/CLIP score are on these
        "help": "size the scores are computed at (default %(default)s, BK-SDM)"})
    scheduler: str = field(default="pndm", metadata={  # the SD-v1 pipelines' own, which generate.py keeps
        "choices": tuple(SCHEDULERS), "help": "sampler (default %(default)s: PNDM/PLMS, the pipelines' own)"})
    seed: int = field(default=1234, metadata={  # generate.py --seed 1234 (here: prompt i uses seed + i)
        "help": "prompt i is drawn with seed + i (default %(default)s)"})
    dtype: str = field(default="auto", metadata={  # fp16 on GPU as generate.py; fp32 on CPU
        "choices": ("auto", "fp32", "fp16", "bf16"), "help": "auto: fp16 on GPU (BK-SDM), fp32 on CPU"})

    def to_json(self) -> dict:
        return asdict(self)


def shard(prompts: list[Prompt], rank: int, world: int) -> list[Prompt]:
    """Process `rank` of `world`'s prompts: every world-th, so shards are balanced and disjoint."""
    return prompts[rank::world]


def image_paths(out: Path, p: Prompt, cfg: GenerationConfig) -> tuple[Path, Path]:
    """(full-size image, resized image) of prompt `p` under ``out/images``."""
    return out / IMAGES_DIR / f"im{cfg.resolution}" / p.file_name, out / IMAGES_DIR / f"im{cfg.resize}" / p.file_name


def is_done(out: Path, p: Prompt, cfg: GenerationConfig) -> bool:
    """The resized image (written last) is there and decodes: one damaged after it was written
    (a garbage or cut-short file) is drawn again, not trusted."""
    from PIL import Image

    small = image_paths(out, p, cfg)[1]
    if not small.is_file():
        return False
    try:
        with Image.open(small) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _encode(img, name: str) -> bytes:
    buf = io.BytesIO()
    fmt = "PNG" if name.lower().endswith(".png") else "JPEG"  # BK-SDM: .jpg at PIL's default quality
    img.save(buf, format=fmt)
    return buf.getvalue()


def save_pair(img, out: Path, p: Prompt, cfg: GenerationConfig) -> None:
    """The image at full size, then resized (the resized one last: its presence marks done)."""
    from PIL import Image

    big, small = image_paths(out, p, cfg)
    write_atomic(big, _encode(img, p.file_name))
    write_atomic(small, _encode(img.resize((cfg.resize, cfg.resize), Image.Resampling.BICUBIC), p.file_name))


def generate(pipe, prompts: list[Prompt], out: Path, cfg: GenerationConfig, *, batch_size: int = 1,
             rank: int = 0, world: int = 1, log=print) -> list[str]:
    """Generate this process's missing images; returns the file names it made. A killed run loses
    at most the batch in flight (every finished image is already on disk)."""
    import time

    from personalize.pipeline import generate as draw

    todo = [p for p in shard(prompts, rank, world) if not is_done(out, p, cfg)]
    done_before = len(shard(prompts, rank, world)) - len(todo)
    if done_before:
        log(f"[{rank}/{world}] {done_before} image(s) already there; {len(todo)} to generate")
    t0, made = time.perf_counter(), []
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        images = draw(pipe, [p.text for p in chunk], [cfg.seed + p.index for p in chunk], steps=cfg.steps,
                      guidance_scale=cfg.guidance_scale, resolution=cfg.resolution)
        for p, img in zip(chunk, images):
            save_pair(img, out, p, cfg)
            made.append(p.file_name)
        n = b + len(chunk)
        log(f"[{rank}/{world}] {n}/{len(todo)} images, {(time.perf_counter() - t0) / n:.2f} s/image")
    return made
