"""Image-caption data for BK-SDM distillation, through 🤗 `datasets`.

Sources (`DataSpec.source`):

- a local folder of images plus ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + a
  caption column), read with the ``imagefolder`` builder, as the BK-SDM scripts do for LAION
  subsets;
- a local folder of data files that `datasets` reads by extension (parquet, arrow, or
  webdataset ``.tar`` shards as written by img2dataset for LAION subsets);
- any `datasets` dataset (hub id or a ``save_to_disk`` dir) with an image and a text column;
  with ``streaming=True`` it is never materialised on disk (LAION-scale sets).

Batches are addressed by number, not drawn from an iterator: batch ``k`` of process ``rank`` is a
pure function of (seed, k, rank), for map-style data. That is what makes `fit`'s resume exact
without saving any data-loader state. Streaming data is re-positioned by skipping raw examples
(cheap: images are decoded only after the skip).

Preprocessing is the BK-SDM recipe's (``kd_train.sh``: ``--resolution 512 --center_crop
--random_flip``): shorter side resized to the resolution (bilinear), center (or random) crop,
random horizontal flip, pixels scaled to [-1, 1]. PIL + numpy only, no model imports here.
"""

from __future__ import annotations

import logging
import os
import random
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from personalize.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DATA_FILE_EXTS = {".parquet", ".arrow", ".tar"}  # shard formats `datasets` reads from a plain folder
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_COLUMN_GUESSES = ("image", "img", "jpg", "png", "pixel_values")
CAPTION_COLUMN_GUESSES = ("text", "caption", "captions", "prompt", "txt", "sentences")
SKIP_LOG_EVERY = 100  # one log line per this many examples skipped as undecodable

logger = logging.getLogger(__name__)


@dataclass
class DataSpec:
    """Where the images and captions come from and how they are preprocessed. Each field is a
    `distill train` flag (``metadata``: its help, and its spelling where that is not the field's)."""

    # image-caption folder, or a `datasets` name / local dataset dir
    source: str = field(metadata={"flag": "--data", "help": "image folder with metadata.jsonl/.csv captions, or a "
                                                            "`datasets` name / saved dataset dir"})
    split: str = field(default="train", metadata={"help": "dataset split to read (default %(default)s)"})
    # None: the column typed Image, else a usual name
    image_column: str | None = field(default=None, metadata={
        "help": "image column (default: the column typed Image, else image/img/jpg/png)"})
    # None: "text", "caption", ...
    caption_column: str | None = field(default=None, metadata={
        "help": "caption column (default: text/caption/prompt/txt...)"})
    # LAION-scale: read as a stream, never materialised
    streaming: bool = field(default=False, metadata={
        "help": "stream the dataset, never materialised (LAION-scale)"})
    # streaming only: examples kept for approximate shuffling
    shuffle_buffer: int = field(default=10_000, metadata={
        "help": "streaming only: examples held for shuffling (default %(default)s)"})
    # first N examples only (smoke runs, ablations)
    max_samples: int | None = field(default=None, metadata={
        "help": "use only the first N examples (smoke runs)"})
    # BK-SDM recipe: 512 px for SD-v1 / SD-v2-base teachers
    resolution: int = field(default=512, metadata={
        "help": "training image size in pixels (default %(default)s, the BK-SDM recipe)"})
    # kd_train.sh: --center_crop (the flag turns it off)
    center_crop: bool = field(default=True, metadata={"flag": "--random-crop", "invert": True,
                                                      "help": "random instead of center crop"})
    # kd_train.sh: --random_flip (the flag turns it off)
    random_flip: bool = field(default=True, metadata={"flag": "--no-flip", "invert": True,
                                                      "help": "no random horizontal flip"})

    def validate(self) -> None:
        """The range checks of `distill train` (messages name the flags); raises UserError."""
        for name in ("resolution", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.resolution % 8:
            raise UserError(f"--resolution {self.resolution}: must be a multiple of 8 (the VAE's factor)")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError("--max-samples must be >= 1")


@dataclass(frozen=True)
class Example:
    """One planned sample: which row, and the augmentation decided for it."""

    index: int | None  # dataset row (map-style); None for streamed rows
    flip: bool
    crop_seed: int  # random crop offset source (unused with center crop)
    caption_seed: int  # which caption when a row has several


# ---------------------------------------------------------------------------- opening
def _image_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()]


def _data_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix.lower() in DATA_FILE_EXTS and p.is_file()]


def open_dataset(spec: DataSpec):
    """Load `spec.source` as a `datasets.Dataset` (or `IterableDataset` when streaming); returns
    ``(dataset, image_column, caption_column)``. Every failure is a one-line UserError."""
    import datasets

    # its "Generating train split" bars would interleave with the training's own progress bar
    datasets.disable_progress_bars()
    root = Path(spec.source).expanduser()
    if spec.source.startswith(("/", "./", "../", "~")) and not root.exists():
        # would otherwise be taken for a hub dataset name and fail with a confusing message
        raise UserError(f"--data {spec.source}: no such folder")
    saved = (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists()
    n_images = len(_image_files(root)) if root.is_dir() and not saved else 0  # one walk: folders can be huge
    if root.is_dir() and not saved and not n_images and _data_files(root):
        try:
            ds = datasets.load_dataset(str(root), split=spec.split, streaming=spec.streaming)
        except Exception as e:  # noqa: BLE001 - mixed formats, corrupt shards, no such split
            raise UserError(f"--data {spec.source}: cannot read the data files ({_one_line(e)})") from None
    elif root.is_dir() and not saved:
        if n_images == 0:
            raise UserError(f"--data {spec.source}: no image files ({', '.join(sorted(IMAGE_EXTS))}) and no data "
                            f"files ({', '.join(sorted(DATA_FILE_EXTS))}) in the folder")
        if not any(any(root.rglob(m)) for m in METADATA_FILES):
            raise UserError(f"--data {spec.source}: {n_images} images but no captions; add metadata.jsonl or "
                            f"metadata.csv with a file_name column and a caption column (e.g. text)")
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=str(root), split=spec.split, streaming=spec.streaming)
        except Exception as e:  # noqa: BLE001 - malformed metadata, unreadable files: one line for the user
            raise UserError(f"--data {spec.source}: cannot read as an image-caption folder ({_one_line(e)})") from None
    elif root.is_dir():
        try:
            ds = datasets.load_from_disk(str(root))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
            if spec.streaming:
                ds = ds.to_iterable_dataset()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--data {spec.source}: cannot load the saved dataset ({_one_line(e)})") from None
    else:
        try:
            ds = datasets.load_dataset(spec.source, split=spec.split, streaming=spec.streaming)
        except Exception as e:  # noqa: BLE001 - not found, offline, no such split
            raise UserError(f"--data {spec.source}: not a folder and not a loadable dataset ({_one_line(e)})") from None
    if spec.max_samples is not None:
        ds = ds.take(spec.max_samples) if spec.streaming else ds.select(range(min(spec.max_samples, len(ds))))
    image_col, caption_col = pick_columns(ds, spec)
    if not spec.streaming and len(ds) == 0:
        raise UserError(f"--data {spec.source}: split '{spec.split}' is empty")
    ds = _undecoded(ds, image_col)
    if root.is_dir() and not saved and n_images and not spec.streaming:
        check_image_files(ds, image_col, spec.source)
    return ds, image_col, caption_col


def _undecoded(ds, image_col: str):
    """An Image column cast to ``decode=False``: rows then carry ``{"bytes", "path"}`` and the
    decoding happens in `decode_image`, where a bad image is caught (skipped and counted) instead of
    raising from inside `datasets` on row access."""
    import datasets

    feature = (ds.features or {}).get(image_col)
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    return ds


def _image_problem(path: str) -> str | None:
    """Why the image file at `path` cannot be trained on, or None. `verify` checks the header and
    structure; a reopened, fully decoded image (JPEGs in draft mode, 1/8 scale: every byte is still
    read) catches truncated data."""
    from PIL import Image, UnidentifiedImageError

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
        return "truncated" if "truncated" in str(e).lower() else _one_line(e)
    return None


def check_image_files(ds, image_col: str, source: str) -> None:
    """Every row's image file exists and decodes, checked before training (a few ms per file, on a
    thread pool). Raises one UserError naming the first bad file and how many there are."""
    from concurrent.futures import ThreadPoolExecutor

    cells = ds[image_col]
    paths = [c.get("path") if isinstance(c, dict) else None for c in cells]
    if not all(paths):  # not file-backed (bytes in the table): decoded lazily, skipped if bad
        return
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        problems = [(p, why) for p, why in zip(paths, pool.map(_image_problem, paths, chunksize=64)) if why]
    if problems:
        root = Path(source).expanduser()
        first, why = problems[0]
        try:
            shown = str(Path(source) / Path(first).resolve().relative_to(root.resolve()))
        except ValueError:
            shown = first
        if why == "no such file":
            why = "named in the metadata, no such file"
        raise UserError(f"--data {source}: {len(problems)} of {len(paths)} images are unusable "
                        f"({shown}: {why}); fix or remove them")


def _one_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__


def pick_columns(ds, spec: DataSpec) -> tuple[str, str]:
    import datasets

    features = ds.features or {}
    cols = list(features) if features else list(getattr(ds, "column_names", None) or [])
    if spec.image_column:
        image_col = spec.image_column
    else:
        typed = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        image_col = typed[0] if typed else next((c for c in IMAGE_COLUMN_GUESSES if c in cols), None)
    if spec.caption_column:
        caption_col = spec.caption_column
    else:
        caption_col = next((c for c in CAPTION_COLUMN_GUESSES if c in cols), None)
    for what, col, flag in (("image", image_col, "--image-column"), ("caption", caption_col, "--caption-column")):
        if col is None or (cols and col not in cols):
            raise UserError(f"--data {spec.source}: no {what} column {'' if col is None else repr(col) + ' '}"
                            f"(columns: {', '.join(cols) or 'unknown'}); pass {flag}")
    return image_col, caption_col


# ---------------------------------------------------------------------------- preprocessing
class BadImage(Exception):
    """An example whose image cannot be decoded; ``str()`` names it and why, in one line."""


def decode_image(image):
    """An image cell (PIL image, ``{"bytes", "path"}`` dict, bytes, path, array) -> RGB PIL image,
    fully decoded; BadImage (naming the file where known) when it cannot be."""
    import io

    from PIL import Image

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
        return image.convert("RGB")  # convert() loads: truncated data fails here, not later
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - whatever PIL raises for bad bytes, it is bad data
        raise BadImage(f"{name + ': ' if name else ''}{_one_line(e)}") from None


def preprocess_image(image, resolution: int, center_crop: bool, flip: bool, crop_seed: int) -> torch.Tensor:
    """Image cell -> float32 CHW tensor in [-1, 1], BK-SDM recipe transforms (see module doc).
    Raises BadImage for an image that cannot be decoded."""
    from PIL import Image

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


def pick_caption(value, caption_seed: int) -> str:
    """A row's caption; rows with several captions (COCO-style lists) get one drawn by seed."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) and all(isinstance(v, str) for v in value):
        return value[random.Random(caption_seed).randrange(len(value))]
    raise UserError(f"caption column holds {type(value).__name__}, expected text or a list of texts")


def _example_seeds(seed: int, position: int, rank: int = 0) -> tuple[bool, int, int]:
    r = np.random.default_rng([seed, rank, position])
    flip, crop, cap = r.integers(0, 2), r.integers(0, 2**31), r.integers(0, 2**31)
    return bool(flip), int(crop), int(cap)


# ---------------------------------------------------------------------------- batches
class _Skips:
    """Examples skipped because their image does not decode: counted, logged (the first, then one
    line per SKIP_LOG_EVERY), and a UserError once more than half of a recent window of examples
    were bad (the data, not the odd file, is the problem)."""

    def __init__(self, source: str, batch_size: int):
        self.source, self.count = source, 0
        self.window: deque[bool] = deque(maxlen=max(16, 2 * batch_size))

    def ok(self) -> None:
        self.window.append(False)

    def bad(self, why: str) -> None:
        self.count += 1
        self.window.append(True)
        if self.count == 1 or self.count % SKIP_LOG_EVERY == 0:
            logger.warning("--data %s: skipped %d example(s) whose image does not decode so far (latest: %s)",
                           self.source, self.count, why)
        n_bad = sum(self.window)
        if n_bad > self.window.maxlen // 2:
            raise UserError(f"--data {self.source}: {n_bad} of the last {len(self.window)} examples have an image "
                            f"that does not decode (latest: {why}); the data is mostly unusable")


def _example(row: dict, e: Example, image_col: str, caption_col: str, spec: DataSpec) -> tuple[torch.Tensor, str]:
    """One row -> (pixels, caption); BadImage when its image does not decode."""
    pixels = preprocess_image(row[image_col], spec.resolution, spec.center_crop, e.flip, e.crop_seed)
    return pixels, pick_caption(row[caption_col], e.caption_seed)


def _stack(examples: list[tuple[torch.Tensor, str]], plan: list[Example]) -> dict:
    return {"pixel_values": torch.stack([x[0] for x in examples]), "captions": [x[1] for x in examples],
            "plan": plan}


class MapBatches:
    """Batches of a map-style dataset by number: epoch-wise permutations seeded by (seed, epoch),
    global batch ``k * world + rank``, so every process sees different rows and resume is exact.

    A row whose image does not decode is skipped (counted in ``skipped``) and replaced by the next
    decodable row of the dataset, so batch ``k`` keeps its size and stays a function of (seed, k,
    rank); the returned ``plan`` names the rows actually used."""

    def __init__(self, ds, image_col: str, caption_col: str, spec: DataSpec, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.ds, self.image_col, self.caption_col, self.spec = ds, image_col, caption_col, spec
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.n = len(ds)
        self._perm: tuple[int, np.ndarray] | None = None
        self._skips = _Skips(spec.source, batch_size)
        self.bad_rows: dict[int, str] = {}  # row -> why its image does not decode

    @property
    def skipped(self) -> int:
        """Examples skipped so far because their image does not decode."""
        return self._skips.count

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def plan(self, k: int) -> list[Example]:
        g = k * self.world + self.rank
        out = []
        for pos in range(g * self.batch_size, (g + 1) * self.batch_size):
            flip, crop, cap = _example_seeds(self.seed, pos)
            out.append(Example(int(self._permutation(pos // self.n)[pos % self.n]),
                               flip and self.spec.random_flip, crop, cap))
        return out

    def batch(self, k: int) -> dict:
        """``{"pixel_values": [B, 3, R, R], "captions": [str], "plan": [Example]}``."""
        examples, plan = [], []
        for e in self.plan(k):
            for step in range(self.n):  # walk forward from the planned row to a decodable one
                i = (e.index + step) % self.n
                if i in self.bad_rows:
                    self._skips.bad(self.bad_rows[i])
                    continue
                try:
                    examples.append(_example(self.ds[i], e, self.image_col, self.caption_col, self.spec))
                except BadImage as b:
                    self.bad_rows[i] = str(b)
                    self._skips.bad(str(b))
                    continue
                self._skips.ok()
                plan.append(replace(e, index=i))
                break
            else:
                raise UserError(f"--data {self.spec.source}: none of the {self.n} examples has an image that "
                                f"decodes (e.g. {next(iter(self.bad_rows.values()))})")
        return _stack(examples, plan)


class StreamBatches:
    """Batches of an `IterableDataset`, read in order (buffer-shuffled per epoch). A request for a
    batch other than the next one (resume) re-opens the stream and skips to its position.

    An example whose image does not decode is skipped (counted in ``skipped``) and the next one
    read in its place; resume positions count batch_size raw examples per batch, so after skips a
    resumed run re-reads a few examples (the stream keeps no per-example state)."""

    def __init__(self, ds, image_col: str, caption_col: str, spec: DataSpec, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        from datasets.distributed import split_dataset_by_node

        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds
        self.image_col, self.caption_col, self.spec = image_col, caption_col, spec
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self._next_k = 0
        self._epoch, self._pos = 0, 0  # epoch and position (in this node's stream) of the iterator
        self._it = None
        self._epoch_len: int | None = None
        self._skips = _Skips(spec.source, batch_size)

    @property
    def skipped(self) -> int:
        """Examples skipped so far because their image does not decode."""
        return self._skips.count

    def _open(self, epoch: int, skip: int):
        d = self.ds.shuffle(seed=self.seed, buffer_size=self.spec.shuffle_buffer) if self.spec.shuffle_buffer > 1 else self.ds
        if skip:
            d = d.skip(skip)
        d.set_epoch(epoch)
        self._it, self._epoch, self._pos = iter(d), epoch, skip

    def _read_failed(self, e: Exception, where: str) -> UserError:
        return UserError(f"--data {self.spec.source}: reading the stream failed {where} ({_one_line(e)}); "
                         f"fix or remove the damaged shard, then resume")

    def _length(self) -> int:
        if self._epoch_len is None:  # caption-only pass: no image bytes decoded
            try:
                self._epoch_len = sum(1 for _ in self.ds.select_columns([self.caption_col]))
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged shard, found only when read
                raise self._read_failed(e, "while counting its examples") from None
            if self._epoch_len == 0:
                raise UserError(f"--data {self.spec.source}: the stream is empty")
        return self._epoch_len

    def _seek(self, position: int):
        n = self._length()
        self._open(position // n, position % n)

    def _next_row(self):
        if self._it is None:
            self._open(0, 0)
        for _ in range(2):
            try:
                row = next(self._it)
                self._pos += 1
                return row
            except StopIteration:
                if self._pos == 0:
                    break
                self._epoch_len = self._pos
                self._open(self._epoch + 1, 0)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged shard: the iterator is dead after it
                raise self._read_failed(e, f"at example {self._pos} of epoch {self._epoch}") from None
        raise UserError(f"--data {self.spec.source}: the stream is empty")

    def batch(self, k: int) -> dict:
        if k != self._next_k:
            self._seek(k * self.batch_size)
        examples, plan = [], []
        for i in range(self.batch_size):
            # positions are per node here (each rank reads its own split of the stream)
            flip, crop, cap = _example_seeds(self.seed, k * self.batch_size + i, self.rank)
            e = Example(None, flip and self.spec.random_flip, crop, cap)
            while True:
                try:
                    examples.append(_example(self._next_row(), e, self.image_col, self.caption_col, self.spec))
                    break
                except BadImage as b:
                    self._skips.bad(str(b))  # raises once most of the recent examples were bad
            self._skips.ok()
            plan.append(e)
        self._next_k = k + 1
        return _stack(examples, plan)


def _collate(rows: list[dict], plan: list[Example], image_col: str, caption_col: str, spec: DataSpec) -> dict:
    """Rows -> a batch, every row used as is (precompute: one latent per row); an image that does
    not decode is a UserError naming it."""
    try:
        return _stack([_example(r, e, image_col, caption_col, spec) for r, e in zip(rows, plan)], plan)
    except BadImage as b:
        raise UserError(f"--data {spec.source}: an image does not decode ({b}); fix or remove it") from None


def make_batches(spec: DataSpec, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Open `spec` and return a MapBatches or StreamBatches with ``.batch(k)``."""
    ds, image_col, caption_col = open_dataset(spec)
    cls = StreamBatches if spec.streaming else MapBatches
    return cls(ds, image_col, caption_col, spec, batch_size, seed, rank, world)
