"""Finding subjects and photos; fetching the public dataset once (served from loopback here)."""

from __future__ import annotations

import http.server
import io
import threading
import zipfile

import pytest

from conftest import write_photos
from personalize.errors import UserError
from personalize.subjects import data_dir, fetch_dataset, find_subject


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
