"""Outputs never clobber inputs, two writers of one output never mix, bad paths are one line, and
the error boundary turns only a user's errors into one line (a bug keeps its traceback)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from personalize.errors import UserError
from personalize.outputs import check_output, lock_path, output_lock


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def _one_line(r, fragment):
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.err, r.err


@pytest.mark.parametrize("case", ["kohya-over-adapter", "kohya-inside-run", "merged-over-run", "merged-over-base",
                                  "generate-over-run"])
def test_an_output_over_an_input_is_refused_even_with_overwrite(case, lora_run, tiny_base, cli):
    before = _digest(lora_run)
    argv = {
        "kohya-over-adapter": ["export", lora_run, "--format", "kohya", "-o",
                               lora_run / "pytorch_lora_weights.safetensors", "--overwrite"],
        "kohya-inside-run": ["export", lora_run, "--format", "kohya", "-o", lora_run / "x.safetensors"],
        "merged-over-run": ["export", lora_run, "--format", "merged", "-o", lora_run, "--overwrite"],
        "merged-over-base": ["export", lora_run, "--format", "merged", "-o", tiny_base, "--overwrite"],
        "generate-over-run": ["generate", lora_run, "--prompt", "x", "-o", lora_run],
    }[case]
    _one_line(cli(*argv), "the input")
    assert _digest(lora_run) == before


@pytest.mark.parametrize("kind,setup,fragment", [
    ("dir", lambda p: p.write_text("a file"), "exists and is not a directory"),
    ("file", lambda p: p.mkdir(), "is a directory"),
    ("dir", lambda p: p.symlink_to(p.parent / "elsewhere"), "is a symlink"),
    ("file", lambda p: p.symlink_to(p.parent / "missing-target"), "is a symlink"),
    ("dir", lambda p: (p.parent / "ro").mkdir(mode=0o555), "is not writable"),
])
def test_bad_output_paths(tmp_path, kind, setup, fragment):
    if os.geteuid() == 0 and fragment == "is not writable":
        pytest.skip("root writes anywhere; the read-only case is covered by the ENOSPC/EROFS boundary test")
    out = tmp_path / "out"
    setup(out)
    target = tmp_path / "ro" / "out" if fragment == "is not writable" else out
    with pytest.raises(UserError, match=fragment):
        check_output(target, kind=kind, overwrite=True)


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_no_obstacle(tmp_path):
    out = tmp_path / "gen"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from personalize.outputs import output_lock
        with output_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"pid {holder.pid}\) is writing it"):
            with output_lock(out):
                pass
    finally:
        holder.kill()  # kill -9: the kernel drops its flock
        holder.wait()
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()


def test_three_writers_never_hold_one_output_at_once(tmp_path):
    """The holder deletes the lock file as it leaves. A writer that opened the old file just before
    (B, waiting) must not count the lock it then gets on a deleted file, or a third writer (C)
    creating the file anew would hold it at the same time. (flock is per open file, so threads
    here race as processes would.)"""
    import threading
    import time

    out = tmp_path / "shared-cache"
    inside, overlaps, b_waiting = [], [], threading.Event()

    def writer(name, hold):
        with output_lock(out, wait=True):
            if inside:
                overlaps.append((name, list(inside)))
            inside.append(name)
            time.sleep(hold)
            inside.remove(name)

    with output_lock(out):  # A
        b = threading.Thread(target=writer, args=("B", 0.6))
        b.start()
        time.sleep(0.3)  # B has opened the file and waits for A's lock
    time.sleep(0.1)  # A is gone (file deleted); B now holds a lock
    c = threading.Thread(target=writer, args=("C", 0.1))
    c.start()
    b.join()
    c.join()
    assert overlaps == []
    assert not lock_path(out).exists()


def test_two_concurrent_generates_into_one_folder(lora_run, tmp_path, monkeypatch, cli):
    """The second writer is refused while the first holds the folder (the holder is simulated by a
    lock taken here, as another process would)."""
    out = tmp_path / "g"
    out.mkdir()
    with output_lock(out):
        # in this process flock is per open file description, so a second open conflicts too
        r = cli("generate", lora_run, "--prompt", "x", "--steps", "1", "-o", out)
    _one_line(r, "is writing it")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("exc,fragment", [
    (OSError(28, "No space left on device", "/runs/x/unet"), "/runs/x/unet: No space left on device; free some space"),
    (OSError(30, "Read-only file system", "/ro/out"), "/ro/out: Read-only file system"),
    (PermissionError(13, "Permission denied", "/etc/out"), "/etc/out: Permission denied"),
])
def test_the_boundary_turns_user_errors_into_one_line(exc, fragment, monkeypatch, capsys):
    from personalize import cli as cli_mod
    from personalize.commands import info

    def boom(args):
        raise exc

    monkeypatch.setattr(info, "_subjects", boom)
    assert cli_mod.main(["subjects"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {fragment}"] or (len(err) == 1 and fragment in err[0])


def test_a_bug_keeps_its_traceback(monkeypatch):
    from personalize import cli as cli_mod
    from personalize.commands import info

    def bug(args):
        raise KeyError("an internal bug")

    monkeypatch.setattr(info, "_subjects", bug)
    with pytest.raises(KeyError):
        cli_mod.main(["subjects"])


def test_debug_shows_the_traceback_of_a_handled_error(monkeypatch, capsys):
    from personalize import cli as cli_mod

    monkeypatch.setenv("PERSONALIZE_DEBUG", "1")
    assert cli_mod.main(["generate", "/nonexistent/run", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: /nonexistent/run")


@pytest.mark.parametrize("component,damage", [("unet", "truncate"), ("text_encoder", "zero"), ("vae", "garbage"),
                                              ("unet", "config")])
def test_a_damaged_run_component_is_one_line_naming_it(component, damage, full_run, tmp_path, cli):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    if damage == "config":
        (run / component / "config.json").write_text("{ not json")
    else:
        f = next((run / component).glob("*.safetensors"))
        data = f.read_bytes()
        f.write_bytes({"truncate": data[: len(data) // 3], "zero": b"", "garbage": b"\x07" * 4096}[damage])
    r = cli("generate", run, "--prompt", "x", "--steps", "1", "-o", tmp_path / "out")
    _one_line(r, f"{run / component}")
    assert not (tmp_path / "out").exists()


def test_run_json_with_an_unknown_method_is_one_line(lora_run, tmp_path, cli):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(meta | {"method": "dreamfusion"}))
    for argv in (["generate", run, "--prompt", "x"], ["export", run, "--format", "kohya", "-o", tmp_path / "k.st"]):
        _one_line(cli(*argv), "method 'dreamfusion'")


def _enospc_after(monkeypatch, module, name, after: int = 0):
    """Make `module.name` fail with ENOSPC on its call number `after` (0-based), having written a
    partial file first where it takes a path, as a full disk does."""
    import errno

    real, calls = getattr(module, name), []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device", str(a[1] if len(a) > 1 else a[0]))
        return real(*a, **k)

    monkeypatch.setattr(module, name, flaky)


def test_disk_full_during_a_merged_export_is_one_line_and_leaves_nothing(lora_run, tmp_path, monkeypatch, cli):
    import diffusers

    _enospc_after(monkeypatch, diffusers.StableDiffusionPipeline, "save_pretrained")
    out = tmp_path / "merged"
    _one_line(cli("export", lora_run, "--format", "merged", "-o", out), "No space left on device")
    assert list(tmp_path.iterdir()) == []  # no output, no hidden temp folder, no lock file


def test_disk_full_while_writing_a_full_run_then_the_rerun_completes(photos, tmp_path, monkeypatch, cli):
    import diffusers

    from conftest import FAST

    args = ["full", "--subject", photos, "--class-noun", "dog", *FAST, "--steps", "2", "--validation-images", "0",
            "--output-dir", tmp_path / "run"]
    with monkeypatch.context() as m:
        _enospc_after(m, diffusers.StableDiffusionPipeline, "save_pretrained")
        _one_line(cli(*args), "No space left on device")
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not (tmp_path / "run" / "run.json").exists()
    assert cli(*args, "--resume").code == 0  # the checkpoint written before the disk filled is intact
    assert (tmp_path / "run" / "run.json").is_file()


def test_disk_full_while_generating_keeps_the_images_already_written(lora_run, tmp_path, monkeypatch, cli):
    from personalize import fileio

    out = tmp_path / "g"
    real, calls = fileio.write_atomic, []

    def flaky(path, data):
        calls.append(path)
        if str(path).endswith(".png") and len([c for c in calls if str(c).endswith(".png")]) > 1:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(fileio, "write_atomic", flaky)
    import personalize.pipeline as pipeline_mod

    monkeypatch.setattr(pipeline_mod, "write_atomic", flaky)
    r = cli("generate", lora_run, "--prompt", "a {token} {class}", "-n", "3", "--steps", "1", "-o", out)
    _one_line(r, "No space left on device")
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")]  # no temp files, no lock
    pngs = [n for n in names if n.endswith(".png")]
    assert len(pngs) == 1 and all((out / n).stat().st_size > 0 for n in pngs)


def test_a_second_training_into_one_output_dir_is_refused(photos, tmp_path, cli):
    from conftest import FAST

    out = tmp_path / "run"
    with output_lock(out):  # the first `personalize lora` into it, still running
        r = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--output-dir", out)
    _one_line(r, "is writing it")
    assert not out.exists()
