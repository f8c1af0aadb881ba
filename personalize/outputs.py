"""Checks every command that writes makes before it loads anything heavy, and the lock that keeps
two processes from writing one output unawares.

- `check_output`: the output is not, does not contain and does not lie inside any input (a run,
  a base, an adapter); it is of the right kind (file or folder); its nearest existing folder is
  writable; a symlink is refused (writing through one lands somewhere the user did not name).
- `output_lock`: an exclusive `flock` on `.NAME.lock` beside the output, holding the writer's
  pid. The kernel drops the lock when its process dies, so a kill -9 leaves nothing to clean up;
  a second writer gets one line naming the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError


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


@contextlib.contextmanager
def output_lock(out: Path, flag: str = "-o") -> Iterator[None]:
    """Hold the writer's lock of `out` for the block; a second writer is refused in one line."""
    path = lock_path(Path(out).expanduser())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"{flag} {out}: another process (pid {holder}) is writing it; wait for it "
                            f"or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
