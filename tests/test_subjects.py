"""Finding subjects and photos; fetching the public dataset once (served from loopback here)."""

from __future__ import annotations

import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import write_photos
from personalize.errors import UserError
from personalize.subjects import data_dir, fetch_dataset, find_subject, read_prompts_file


@pytest.fixture
def zip_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving a zip shaped like the dataset repository's archive."""
    src = tmp_path / "src"
    write_photos(src / "dreambooth-main" / "dataset" / "dog", n=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(src))
    payload = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/main.zip"
    srv.shutdown()


def test_fetch_puts_the_dataset_folder_in_place(zip_server, tmp_path, monkeypatch):
    monkeypatch.delenv("PERSONALIZE_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    dest = tmp_path / "data" / "dreambooth" / "dataset"
    assert fetch_dataset(dest, url=zip_server) == dest
    assert sorted(p.name for p in (dest / "dog").iterdir()) == ["00.jpg", "01.jpg"]
    assert [p.name for p in dest.parent.iterdir()] == ["dataset"]  # no temp leftovers


def test_fetch_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("PERSONALIZE_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    dest = tmp_path / "d" / "dataset"
    with pytest.raises(UserError, match="download failed") as e:
        fetch_dataset(dest, url="http://127.0.0.1:9/none.zip", timeout=2)
    assert "\n" not in str(e.value) and not dest.exists()
    assert list(tmp_path.iterdir()) == []  # the folders it made for the download are gone too


def test_readme_main_line_offline_is_one_line_and_writes_nothing(tmp_path, monkeypatch, cli):
    """`personalize lora --subject dog --base bk-sdm-base` on a fresh, offline machine."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PERSONALIZE_OFFLINE")  # only HF_HUB_OFFLINE, as a user would set it
    r = cli("lora", "--subject", "dog", "--base", "bk-sdm-base")
    assert r.code == 2 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "nota-ai/bk-sdm-base" in lines[0] and "Traceback" not in r.err
    assert list(tmp_path.iterdir()) == []


def test_data_dir_precedence(monkeypatch, tmp_path):
    assert data_dir(str(tmp_path)) == (tmp_path, False)
    monkeypatch.setenv("PERSONALIZE_DATA", str(tmp_path / "env"))
    assert data_dir(None) == (tmp_path / "env", False)
    monkeypatch.delenv("PERSONALIZE_DATA")
    assert data_dir(None)[1] is True


def test_own_photo_folder_and_dataset_subject(dataset, tmp_path):
    own = write_photos(tmp_path / "rex", n=2)
    s = find_subject(str(own), class_noun="dog")
    assert (s.name, s.class_noun, s.kind) == ("rex", "dog", "live")
    s = find_subject("backpack", str(dataset))
    assert (s.class_noun, s.kind, s.image_dir) == ("backpack", "object", (dataset / "backpack").resolve())
    with pytest.raises(UserError, match="no folder"):
        find_subject("vase", str(dataset))


def test_prompts_file_lines_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# mine\n  a {token} {class}  \n\n   # indented comment\na #1 dog\n")
    assert read_prompts_file(f, "--prompts") == ["a {token} {class}", "a #1 dog"]
    assert read_prompts_file(f, "--prompts", comments=False) == [
        "# mine", "a {token} {class}", "# indented comment", "a #1 dog"]
    f.write_text("\n# only a comment\n")
    assert read_prompts_file(f, "--prompts") == []  # the caller decides whether that is an error


@pytest.mark.parametrize("make, msg", [
    (lambda d: d / "missing.txt", "unreadable (no such file)"),
    (lambda d: d, "not a regular file"),
    (lambda d: Path("/dev/zero"), "not a regular file"),
    (lambda d: (d / "big.txt").write_text("a dog\n" * 200) and d / "big.txt", "1200 bytes; a prompts file is at most"),
    (lambda d: (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1")) and d / "latin1.txt",
     "unreadable (not UTF-8 text)"),
])
def test_a_bad_prompts_file_is_one_line_naming_flag_and_file(tmp_path, make, msg):
    path = make(tmp_path)
    with pytest.raises(UserError) as e:
        read_prompts_file(path, "--sample-prompts", max_bytes=1000)
    assert str(e.value).startswith(f"--sample-prompts {path}: ") and msg in str(e.value) and "\n" not in str(e.value)


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    """Notepad saves UTF-8 with a BOM: it must not become a character of the first prompt (or of a
    caption, or of a CSV's first header)."""
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa {token} {class} on a café table\nsecond\n".encode())
    assert read_prompts_file(f, "--sample-prompts") == ["a {token} {class} on a café table", "second"]
