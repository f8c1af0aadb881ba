"""Atomic file writes: readers (and a second process writing the same file, e.g. two shards
generating one class image) never see half a file. Each write goes to a unique temp file in the
destination's folder and is renamed over the destination."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, text)
