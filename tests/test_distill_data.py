"""distill/train_data/: every source kind `distill train --data` accepts, read through `datasets`,
map-style and streamed, on a few synthetic image-caption pairs."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import write_photos
from distill.train_data.batches import make_batches
from distill.train_data.sources import DataSpec
from personalize.errors import UserError

N = 4
CAPTIONS = [f"a photo of thing {i}" for i in range(N)]


def _photos(root: Path) -> list[Path]:
    return sorted(write_photos(root, n=N, size=(40, 56), seed=5).glob("*.jpg"))


def csv_folder(root: Path) -> Path:
    files = _photos(root / "csv")
    with (root / "csv" / "metadata.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows([p.name, c] for p, c in zip(files, CAPTIONS))
    return root / "csv"


def _hf_dataset(root: Path):
    import datasets

    images = [Image.open(p).convert("RGB") for p in _photos(root / "src")]
    return datasets.Dataset.from_dict({"image": images, "text": CAPTIONS}).cast_column("image", datasets.Image())


def saved_dataset(root: Path) -> Path:
    _hf_dataset(root).save_to_disk(str(root / "saved"))
    return root / "saved"


def parquet_folder(root: Path) -> Path:
    (root / "pq").mkdir()
    _hf_dataset(root).to_parquet(str(root / "pq" / "train-00000.parquet"))
    return root / "pq"


def webdataset_folder(root: Path) -> Path:
    """img2dataset's layout for LAION subsets: tar shards of KEY.jpg + KEY.txt."""
    (root / "wds").mkdir()
    with tarfile.open(root / "wds" / "00000.tar", "w") as tar:
        for i, (p, c) in enumerate(zip(_photos(root / "src"), CAPTIONS)):
            for name, data in ((f"{i:05d}.jpg", p.read_bytes()), (f"{i:05d}.txt", c.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root / "wds"


SOURCES = {"csv": csv_folder, "saved": saved_dataset, "parquet": parquet_folder, "webdataset": webdataset_folder}


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_source_kind_yields_image_caption_batches(kind, streaming, tmp_path):
    src = SOURCES[kind](tmp_path)
    # no shuffle buffer: datasets' buffered shuffle of a parquet stream stalls ~5 s at the end of
    # an epoch (a library timeout, harmless at LAION scale); shuffling is tested in test_distill.py
    spec = DataSpec(source=str(src), resolution=32, streaming=streaming, shuffle_buffer=1)
    batches = make_batches(spec, batch_size=2, seed=0)
    got = [batches.batch(k) for k in range(2)]
    assert sorted(c for b in got for c in b["captions"]) == CAPTIONS  # one epoch: every row once
    for b in got:
        assert b["pixel_values"].shape == (2, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
        assert -1 <= b["pixel_values"].min() < b["pixel_values"].max() <= 1


def test_rows_with_several_captions_get_one_drawn_by_seed(tmp_path):
    import datasets

    images = [Image.open(p).convert("RGB") for p in _photos(tmp_path / "src")]
    caps = [[f"first {i}", f"second {i}"] for i in range(N)]
    ds = datasets.Dataset.from_dict({"image": images, "captions": caps}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "multi"))
    spec = DataSpec(source=str(tmp_path / "multi"), resolution=32)
    drawn = [c for k in range(N // 2) for c in make_batches(spec, 2, seed=0).batch(k)["captions"]]
    assert all(c.split()[0] in {"first", "second"} for c in drawn)
    again = [c for k in range(N // 2) for c in make_batches(spec, 2, seed=0).batch(k)["captions"]]
    assert drawn == again


def test_explicit_columns_and_column_errors(tmp_path):
    src = saved_dataset(tmp_path)
    spec = DataSpec(source=str(src), resolution=32, caption_column="nope")
    with pytest.raises(UserError, match="no caption column 'nope'.*--caption-column"):
        make_batches(spec, 2, seed=0)
    spec = DataSpec(source=str(src), resolution=32, image_column="image", caption_column="text", max_samples=2)
    b = make_batches(spec, 2, seed=0)
    assert b.n == 2


def test_bad_folders_give_one_line_errors(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.md").write_text("no data here")
    with pytest.raises(UserError, match="no image files .* and no data files"):
        make_batches(DataSpec(source=str(tmp_path / "junk")), 2, seed=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-0.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read the data files") as e:
        make_batches(DataSpec(source=str(tmp_path / "bad")), 2, seed=0)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such folder"):
        make_batches(DataSpec(source=str(tmp_path / "missing")), 2, seed=0)
    broken = tmp_path / "broken"
    write_photos(broken, n=2)
    (broken / "metadata.jsonl").write_text(json.dumps({"file_name": "00.jpg", "text": "ok"}) + "\n{not json\n")
    with pytest.raises(UserError, match="cannot read as an image-caption folder"):
        make_batches(DataSpec(source=str(broken)), 2, seed=0)


# ---------------------------------------------------------------------------- bad images
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


BAD_FILES = {  # how to spoil one image of a folder -> (the file named, what the message says)
    "truncated jpeg": (lambda root: _truncate(root / "01.jpg"), "01.jpg", "truncated"),
    "zero-byte image": (lambda root: (root / "01.jpg").write_bytes(b""), "01.jpg", "empty file"),
    "not an image, .jpg suffix": (lambda root: (root / "01.jpg").write_text("<html>404</html>"), "01.jpg",
                                  "not a readable image"),
    "metadata names a missing file": (lambda root: (root / "01.jpg").unlink(), "01.jpg", "no such file"),
}


@pytest.mark.parametrize("meta", ["jsonl", "csv"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_image_folder_checked_up_front_one_line_naming_the_file(case, meta, tmp_path):
    root = tmp_path / "imgs"
    files = _photos(root)
    if meta == "jsonl":
        (root / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": p.name, "text": c}) + "\n" for p, c in zip(files, CAPTIONS)))
    else:
        with (root / "metadata.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["file_name", "text"], *([p.name, c] for p, c in zip(files, CAPTIONS))])
    spoil, name, why = BAD_FILES[case]
    spoil(root)
    with pytest.raises(UserError) as e:
        make_batches(DataSpec(source=str(root), resolution=32), 2, seed=0)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"1 of {N} images are unusable ({root / name}: " in msg and why in msg and "fix or remove" in msg


def test_up_front_check_counts_every_bad_file_and_names_the_first(tmp_path):
    src = csv_folder(tmp_path)
    _truncate(src / "02.jpg")
    (src / "03.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=rf"2 of {N} images are unusable \({src / '02.jpg'}: truncated"):
        make_batches(DataSpec(source=str(src), resolution=32), 2, seed=0)
    # --max-samples: only the rows used are checked
    assert make_batches(DataSpec(source=str(src), resolution=32, max_samples=2), 2, seed=0).n == 2


def _bytes_dataset(root: Path, spoil: dict[int, bytes]):
    """A saved dataset with the images' bytes in the table (decoded only when read): not checkable
    up front, so a bad one is skipped when met."""
    import datasets

    imgs = [{"bytes": spoil.get(i, p.read_bytes()), "path": None} for i, p in enumerate(_photos(root / "src"))]
    ds = datasets.Dataset.from_dict({"image": imgs, "text": CAPTIONS}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(root / "saved"))
    return root / "saved"


def _bad_webdataset(root: Path, spoil: dict[int, bytes]) -> Path:
    src = webdataset_folder(root)
    members = []
    with tarfile.open(src / "00000.tar") as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    with tarfile.open(src / "00000.tar", "w") as tar:
        for name, data in members:
            i = int(name.split(".")[0])
            if name.endswith(".jpg") and i in spoil:
                data = spoil[i]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return src


LAZY_SOURCES = {"saved bytes, map": (_bytes_dataset, False), "saved bytes, stream": (_bytes_dataset, True),
                "webdataset, map": (_bad_webdataset, False), "webdataset, stream": (_bad_webdataset, True)}
BAD_BYTES = {"truncated jpeg": lambda good: good[: len(good) // 2], "zero bytes": lambda good: b"",
             "not an image": lambda good: b"<html>404</html>"}


@pytest.mark.parametrize("bad", list(BAD_BYTES))
@pytest.mark.parametrize("kind", list(LAZY_SOURCES))
def test_lazily_decoded_bad_example_is_skipped_and_counted(kind, bad, tmp_path, caplog):
    build, streaming = LAZY_SOURCES[kind]
    good = _photos(tmp_path / "src")[1].read_bytes()
    src = build(tmp_path, {1: BAD_BYTES[bad](good)})
    spec = DataSpec(source=str(src), resolution=32, streaming=streaming, shuffle_buffer=1)
    batches = make_batches(spec, batch_size=2, seed=0)
    with caplog.at_level("WARNING", logger="distill.train_data"):
        got = [batches.batch(k) for k in range(2)]  # one epoch's worth: the bad row is met once
    for b in got:
        assert b["pixel_values"].shape == (2, 3, 32, 32)
    captions = [c for b in got for c in b["captions"]]
    assert CAPTIONS[1] not in captions
    assert batches.skipped == 1
    assert any("skipped 1 example" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_mostly_bad_data_stops_with_one_line(streaming, tmp_path):
    src = _bytes_dataset(tmp_path, {i: b"junk" for i in range(1, N)})  # 3 of 4 bad
    batches = make_batches(DataSpec(source=str(src), resolution=32, streaming=streaming, shuffle_buffer=1), 2, seed=0)
    with pytest.raises(UserError, match="examples have an image that does not decode.*mostly unusable") as e:
        for k in range(20):
            batches.batch(k)
    assert "\n" not in str(e.value)


def test_all_bad_map_data_stops_with_one_line(tmp_path):
    src = _bytes_dataset(tmp_path, {i: b"" for i in range(N)})
    with pytest.raises(UserError, match=f"none of the {N} examples has an image that decodes .*empty image") as e:
        make_batches(DataSpec(source=str(src), resolution=32), 2, seed=0).batch(0)
    assert "\n" not in str(e.value)


def test_precompute_collate_names_an_undecodable_row(tmp_path):
    from distill.train_data.batches import Example, collate

    src = _bytes_dataset(tmp_path, {0: b"junk"})
    b = make_batches(DataSpec(source=str(src), resolution=32), 2, seed=0)
    with pytest.raises(UserError, match="an image does not decode.*fix or remove it"):
        collate([b.ds[0]], [Example(0, False, 0, 0)], b.image_col, b.caption_col, b.spec)


def _transparent_png_and_rotated_jpeg(root: Path) -> tuple[Path, Path]:
    """A PNG whose left half is fully transparent (black under the alpha), and a 32x16 JPEG, left
    half red, right half blue, tagged EXIF orientation 6 (shown rotated 90 degrees clockwise)."""
    root.mkdir(parents=True, exist_ok=True)
    png = Image.new("RGBA", (16, 16), (0, 200, 0, 255))
    png.paste((0, 0, 0, 0), (0, 0, 8, 16))
    png.save(root / "transparent.png")
    jpg = Image.new("RGB", (32, 16), (220, 0, 0))
    jpg.paste((0, 0, 220), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    jpg.save(root / "rotated.jpg", exif=exif.tobytes(), quality=95)
    return root / "transparent.png", root / "rotated.jpg"


def test_distill_decodes_images_as_personalize_does(tmp_path):
    """Transparent pixels come out white and EXIF orientation is applied, for every kind of image
    cell a dataset row can hold, exactly as personalize decodes a training photo."""
    import numpy as np

    from distill.train_data.decode import decode_image
    from personalize.data import open_image

    png, jpg = _transparent_png_and_rotated_jpeg(tmp_path / "imgs")
    for path in (png, jpg):
        want = np.asarray(open_image(path))
        cells = [str(path), {"bytes": path.read_bytes(), "path": str(path)}, path.read_bytes(), Image.open(path)]
        for cell in cells:
            got = np.asarray(decode_image(cell))
            assert got.shape == want.shape and np.array_equal(got, want), (path.name, type(cell).__name__)
    assert np.asarray(decode_image(str(png)))[0, 0].tolist() == [255, 255, 255]  # on white, not black
    assert decode_image(str(jpg)).size == (16, 32)  # upright: portrait


def test_distill_batches_see_upright_photos_on_white(tmp_path):
    png, jpg = _transparent_png_and_rotated_jpeg(tmp_path / "pairs")
    with (tmp_path / "pairs" / "metadata.jsonl").open("w") as f:
        for p in (png, jpg):
            f.write(json.dumps({"file_name": p.name, "text": p.stem}) + "\n")
    spec = DataSpec(source=str(tmp_path / "pairs"), resolution=16, random_flip=False)
    b = make_batches(spec, 2, seed=0).batch(0)
    px = dict(zip(b["captions"], b["pixel_values"]))
    assert torch.allclose(px["transparent"][:, :, :8], torch.ones(3, 16, 8))  # transparent half: white
    red = px["rotated"][0] > 0.5
    assert red[:7].all() and not red[9:].any()  # rotated: red on top, blue below (stored: side by side)
