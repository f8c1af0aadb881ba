"""Atomic writes: concurrent writers of one file (two shards saving the same class image) never
trip over each other's temp file, and a failed write leaves neither a temp file nor half a file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest

from personalize.fileio import atomic_dir, atomic_file, write_atomic, write_json


def test_concurrent_writers_of_one_file_all_succeed(tmp_path):
    target, errors = tmp_path / "shared.json", []

    def writer(i):
        try:
            for k in range(200):
                write_json(target, {"writer": i, "k": k})
        except Exception as e:  # noqa: BLE001 - the test collects whatever a writer hits
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and target.read_text().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]

def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = write_atomic(tmp_path / "a.txt", "old")

    with pytest.raises(TypeError):
        write_atomic(target, 123)  # not str/bytes: fails while writing the temp file
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_files_and_dirs_get_the_permissions_plain_open_would(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    (tmp_path / "plain_dir").mkdir()
    f = write_json(tmp_path / "a.json", {"a": 1})
    with atomic_file(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"b")
    with atomic_dir(tmp_path / "d") as d:
        (d / "inner.txt").write_text("i")
    assert _mode(f) == _mode(tmp_path / "b.bin") == _mode(plain) == 0o666 & ~umask
    assert _mode(tmp_path / "d") == _mode(tmp_path / "plain_dir") == 0o777 & ~umask
    assert _mode(tmp_path / "d" / "inner.txt") == 0o666 & ~umask


def test_atomic_dir_failure_leaves_nothing_and_keeps_the_old(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as d:
        (d / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest, replace=True) as d:
            (d / "v").write_text("2")
            raise RuntimeError("disk full, say")
    assert (dest / "v").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(FileExistsError):
        with atomic_dir(dest) as d:  # no replace: an existing output is not clobbered
            pass
    with atomic_dir(dest, replace=True) as d:
        (d / "v").write_text("3")
    assert (dest / "v").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_temp_folders_of_a_dead_writer_are_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-abc123"
    stale.mkdir()
    (stale / "partial.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getppid()}-def456"  # a live process's: left alone
    live.mkdir()
    with atomic_dir(tmp_path / "out") as d:
        (d / "x").write_text("x")
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "x").is_file()


def test_run_outputs_are_readable_by_others_under_umask_022(lora_run, full_run):
    """The bug of issue 11: mkstemp/mkdtemp made run outputs 0600/0700. Fixtures run under the
    test process's umask; check against it."""
    mask = os.umask(0o022)
    os.umask(mask)
    for run in (lora_run, full_run):
        for p in [run, *run.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            assert _mode(p) == want, p
