"""Batches of image-caption data by number, for BK-SDM distillation.

Batches are addressed by number, not drawn from an iterator: batch ``k`` of process ``rank`` is a
pure function of (seed, k, rank), for map-style data. That is what makes `fit`'s resume exact
without saving any data-loader state. Streaming data is re-positioned by skipping raw examples
(cheap: images are decoded only after the skip). An example whose image does not decode is
skipped and counted; most of a recent window bad is a UserError.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import torch

from personalize.errors import UserError, one_line

from .decode import BadImage, preprocess_image
from .sources import DataSpec, open_dataset

SKIP_LOG_EVERY = 100  # one log line per this many examples skipped as undecodable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One planned sample: which row, and the augmentation decided for it."""

    index: int | None  # dataset row (map-style); None for streamed rows
    flip: bool
    crop_seed: int  # random crop offset source (unused with center crop)
    caption_seed: int  # which caption when a row has several


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
            # the form of every warning (personalize.errors.warn); logging prints it bare on stderr
            logger.warning("warning: --data %s: skipped %d example(s) whose image does not decode so far (latest: %s)",
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
        return UserError(f"--data {self.spec.source}: reading the stream failed {where} ({one_line(e)}); "
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


def collate(rows: list[dict], plan: list[Example], image_col: str, caption_col: str, spec: DataSpec) -> dict:
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
