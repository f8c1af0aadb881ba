"""Atomic outputs: files and whole directories appear complete or not at all.

Readers (and a second process writing the same output, e.g. two shards generating one class
image) never see half a file. Each write goes to a uniquely named temp file or folder beside the
destination, and is renamed over it. Outputs get the permissions a plain `open()` / `mkdir()`
would give under the user's umask (mkstemp/mkdtemp alone make them 0600/0700, unreadable to a
web server or another user of a shared box). Temp folders carry the writer's pid, so the next
writer of the same output removes those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process umask (only readable by setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_open_would(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def as_open_would(root: Path) -> None:
    """Give `root` and everything below it plain-`open()` permissions. Library writers do not all
    respect the umask (safetensors 0.8 writes its files 0600), and our outputs are read by others."""
    root = Path(root)
    _as_open_would(root, root.is_dir())
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames:
                _as_open_would(Path(dirpath) / n, True)
            for n in filenames:
                _as_open_would(Path(dirpath) / n, False)


def write_atomic(path: Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        _as_open_would(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, text)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temp path beside `path` for a writer that wants a file name (safetensors' `save_file`);
    renamed over `path` when the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        as_open_would(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(?:tmp|old)-(\d+)-[A-Za-z0-9_]+$")


def remove_stale_temps(dest: Path) -> list[Path]:
    """Remove the temp folders of `dest` that a dead process left beside it; returns them."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern, removed = _temp_pattern(dest.name), []
    for p in dest.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def scratch_dir(dest: Path) -> Iterator[Path]:
    """A temp folder beside `dest` (same filesystem, so renames out of it are atomic), always
    removed at the end; for writers that need a folder to produce one file or a few entries."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Build a directory in a temp folder beside `dest`, then rename it into place.

    The block writes into the yielded folder. On success it becomes `dest`: a missing `dest` is
    simply created; an existing one is swapped out only with `replace` (renamed aside, then
    removed, so `dest` is never absent-yet-half-written), else it is an error. On any exception
    the temp folder is removed and `dest` is untouched.
    """
    dest = Path(dest)
    with scratch_dir(dest) as tmp:
        yield tmp
        as_open_would(tmp)
        if not (dest.exists() or dest.is_symlink()):
            tmp.rename(dest)
            return
        if not replace:
            raise FileExistsError(f"{dest} appeared while it was being written")
        old = dest.parent / f".{dest.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"
        dest.rename(old)
        try:
            tmp.rename(dest)
        except BaseException:
            old.rename(dest)
            raise
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def move_into(src_dir: Path, dest_dir: Path) -> list[str]:
    """Move each entry of `src_dir` into `dest_dir` (an existing folder holding other files, such
    as a run dir), replacing same-named entries one rename at a time; returns the names moved."""
    names = []
    for child in sorted(Path(src_dir).iterdir()):
        as_open_would(child)
        target = Path(dest_dir) / child.name
        if target.is_dir() and not target.is_symlink():
            aside = target.parent / f".{target.name}.old-{os.getpid()}-x"
            target.rename(aside)
            child.rename(target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(child, target)
        names.append(child.name)
    return names
