"""What ``--data`` names, opened as a 🤗 `datasets` dataset (`DataSpec.source`):

- a local folder of images plus ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + a
  caption column), read with the ``imagefolder`` builder, as the BK-SDM scripts do for LAION
  subsets;
- a local folder of data files that `datasets` reads by extension (parquet, arrow, or
  webdataset ``.tar`` shards as written by img2dataset for LAION subsets);
- any `datasets` dataset (hub id or a ``save_to_disk`` dir) with an image and a text column;
  with ``streaming=True`` it is never materialised on disk (LAION-scale sets).

Image columns are left undecoded (`decode` decodes, where a bad image is caught); every failure
to open is a one-line UserError naming ``--data``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from personalize.errors import UserError, one_line


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DATA_FILE_EXTS = {".parquet", ".arrow", ".tar"}  # shard formats `datasets` reads from a plain folder
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_COLUMN_GUESSES = ("image", "img", "jpg", "png", "pixel_values")
CAPTION_COLUMN_GUESSES = ("text", "caption", "captions", "prompt", "txt", "sentences")


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
            raise UserError(f"--data {spec.source}: cannot read the data files ({one_line(e)})") from None
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
            raise UserError(f"--data {spec.source}: cannot read as an image-caption folder ({one_line(e)})") from None
    elif root.is_dir():
        try:
            ds = datasets.load_from_disk(str(root))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
            if spec.streaming:
                ds = ds.to_iterable_dataset()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--data {spec.source}: cannot load the saved dataset ({one_line(e)})") from None
    else:
        try:
            ds = datasets.load_dataset(spec.source, split=spec.split, streaming=spec.streaming)
        except Exception as e:  # noqa: BLE001 - not found, offline, no such split
            raise UserError(f"--data {spec.source}: not a folder and not a loadable dataset ({one_line(e)})") from None
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


def check_image_files(ds, image_col: str, source: str) -> None:
    """Every row's image file exists and decodes, checked before training (a few ms per file, on a
    thread pool). Raises one UserError naming the first bad file and how many there are."""
    from concurrent.futures import ThreadPoolExecutor

    from .decode import image_file_problem  # decoding loads torch; `--help` builds flags from DataSpec

    cells = ds[image_col]
    paths = [c.get("path") if isinstance(c, dict) else None for c in cells]
    if not all(paths):  # not file-backed (bytes in the table): decoded lazily, skipped if bad
        return
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        problems = [(p, why) for p, why in zip(paths, pool.map(image_file_problem, paths, chunksize=64)) if why]
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
