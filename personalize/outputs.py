"""Checks every command that writes makes before it loads anything heavy, and the lock that keeps
two processes from writing one output unawares.

- `check_output`: the output is not, does not contain and does not lie inside any input (a run,
  a base, an adapter); it is of the right kind (file or folder); its nearest existing folder is
  writable; a symlink is refused (writing through one lands somewhere the user did not name).
- `output_lock`: an exclusive `flock` on `.NAME.lock` beside the output, holding the writer's
  pid. The kernel drops the lock when its process dies, so a kill -9 leaves nothing to clean up;
  a second writer gets one line naming the holder (or, with `wait`, waits its turn). The one lock
  of the package: outputs, shared caches and the batch summary all take it.
- `slug`: a folder name from free text.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError


def slug(text: str) -> str:
    """A folder name from free text (a base name, hub id or path, a prompt): letters, digits and
    `._-`, never starting with a dot or a dash (a hidden folder is skipped by eval and report,
    so `--base ../x` must not become `..-..-x`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lstrip(".-") or "x"


def _real(p: Path) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))


def _related(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    return None


def check_output(out: Path, *, kind: str, inputs: Iterable[Path] = (), flag: str = "-o",
                 overwrite: bool = False, allow_existing_dir: bool = False) -> Path:
    """Refuse a bad output up front (one line naming it); returns the path as given, expanded.

    kind: "file" or "dir". An existing output is refused unless `overwrite`, except a folder with
    `allow_existing_dir` (generate adds to its own folder and reuses what matches)."""
    out = Path(out).expanduser()
    if out.is_symlink():
        target = os.readlink(out)
        raise UserError(f"{flag} {out}: is a symlink (to {target}); name the real path")
    real = _real(out)
    for inp in inputs:
        if inp is None:
            continue
        how = _related(real, _real(inp))
        if how:
            raise UserError(f"{flag} {out}: {how} the input {inp}; an output may never overwrite what it reads")
    if out.exists():
        if kind == "dir" and not out.is_dir():
            raise UserError(f"{flag} {out}: exists and is not a directory")
        if kind == "file" and out.is_dir():
            raise UserError(f"{flag} {out}: is a directory; name a file")
        if not overwrite and not (kind == "dir" and allow_existing_dir):
            raise UserError(f"{flag} {out}: already exists; pass --overwrite to replace it")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if parent != out and not parent.is_dir():
        raise UserError(f"{flag} {out}: {parent} is a file, not a directory")
    check = parent if parent.is_dir() else parent.parent
    if not os.access(check, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {check} is not writable")
    return out


def lock_path(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _open_locked(path: Path, wait: bool) -> int | None:
    """An fd of `path` holding its exclusive lock, or None when another process holds it (not
    `wait`). The holder deletes the file before it unlocks; a writer that opened the old file just
    before then holds a lock on a name nobody else sees, so the lock counts only while `path`
    still names the locked file, else it is taken again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was replaced under us: lock the one that is there now


def _holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "?"
    except OSError:
        return "?"


@contextlib.contextmanager
def output_lock(out: Path, flag: str = "-o", wait: bool = False) -> Iterator[None]:
    """Hold the writer's lock of `out` for the block. A second writer is refused in one line, or
    with `wait` (several processes filling one shared cache) blocks until the first is done."""
    path = lock_path(Path(out).expanduser())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, wait)
    if fd is None:
        raise UserError(f"{flag} {out}: another process (pid {_holder(path)}) is writing it; wait for it "
                        f"or choose another output")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # removed while still locked, so no one can lock this file after it is gone from the folder
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
