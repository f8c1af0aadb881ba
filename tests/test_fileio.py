"""Atomic writes: concurrent writers of one file (two shards saving the same class image) never
trip over each other's temp file, and a failed write leaves neither a temp file nor half a file."""

from __future__ import annotations

import threading

import pytest

from personalize.fileio import write_atomic, write_json

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
