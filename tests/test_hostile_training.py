"""Issue 25 on the training inputs: hostile photo folders, captions and masks. Bad input is one
line `error: <what>: <why>` naming the culprit, exit 2, the inputs untouched and no run dir;
odd-but-valid input trains. (Method and steering flags: test_hostile_flags.py; the app's inputs:
test_app.py.)"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, write_photos

from personalize.errors import UserError

QUICK = [*FAST, "--steps", "1", "--class-images", "0", "--validation-images", "0"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry of a folder (links as their target) with a hash of its bytes: the inputs untouched."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_symlink():
            out[p.name] = "-> " + str(p.readlink())
        elif p.is_file():
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[p.name] = "dir"
    return out


def refused(cli, tmp_path, folder: Path, culprit, *extra, method="lora") -> str:
    """Train on `folder`: exit 2, one `error: ` line naming `culprit`, no traceback, no run dir, the
    folder as it was. Returns the line."""
    before = snapshot(folder)
    out = tmp_path / "run"
    r = cli(method, "--subject", folder, "--class-noun", "dog", *QUICK, "--output-dir", out, *extra)
    lines = r.err.strip().splitlines()
    assert r.code == 2, r.err
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert str(culprit) in lines[0], (culprit, lines[0])
    assert not out.exists()
    assert snapshot(folder) == before
    return lines[0]


def photos(tmp_path, name="dog", n=3) -> Path:
    return write_photos(tmp_path / name, n=n, size=(64, 64))


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels and holds none: what a decompression bomb's header looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------- masks: every mode reads alike
def _mask_in_mode(level: int, mode: str, size=(16, 16)) -> Image.Image:
    """A uniform mask of grey `level` (0-255) written the way an editor would in `mode`."""
    if mode == "P":  # a two-colour palette, the mask's grey at index 1 (as editors write masks)
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, level, level, level] + [0] * 762)
        return img
    if mode == "I;16":
        return Image.fromarray(np.full(size[::-1], level * 257, np.uint16))
    if mode == "1":
        return Image.new("1", size, 1 if level else 0)
    return Image.new("L", size, level).convert(mode)


MASK_MODES = ["L", "P", "LA", "1", "I;16", "RGB", "RGBA"]


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("level", [255, 128])
def test_a_mask_weighs_the_loss_alike_in_every_mode(tmp_path, mode, level):
    """A white (or grey) mask in palette, LA, 1-bit, 16-bit, RGB or RGBA mode gives the loss the
    weights the same mask in L mode gives (a palette white mask read as index 1 was ~0: no training)."""
    from personalize.data import load_masks

    if mode == "1" and level != 255:
        pytest.skip("a 1-bit mask is black or white")
    ref = tmp_path / "ref"
    got = tmp_path / mode.replace(";", "")
    for d, m in ((ref, "L"), (got, mode)):
        d.mkdir()
        Image.new("RGB", (16, 16), "red").save(d / "a.jpg")
        _mask_in_mode(level, m).save(d / "a.mask.png")
    expected = load_masks([ref / "a.jpg"], 16)
    assert expected.min() > 0.49  # the reference is the mask's grey, not zero
    assert np.allclose(load_masks([got / "a.jpg"], 16).numpy(), expected.numpy(), atol=1 / 255)


def test_sixteen_bit_is_scaled_by_its_depth_not_its_content():
    """A dark 16-bit mask (or photo) stays dark: 200 of 65535 is ~0, not 200 of 255."""
    from personalize.data import to_rgb

    assert to_rgb(Image.fromarray(np.full((4, 4), 200, np.uint16))).getpixel((0, 0)) == (1, 1, 1)


def test_a_transparent_part_of_a_mask_weighs_nothing(tmp_path):
    """An RGBA mask painted white on a transparent layer: the transparent part is not painted."""
    from personalize.data import load_masks

    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.jpg")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = 255  # the left half painted white, opaque; the right half (0, 0, 0, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.mask.png")
    m = load_masks([tmp_path / "a.jpg"], 16)[0, 0]
    assert m[:, :8].eq(1).all() and m[:, 8:].eq(0).all()


@pytest.mark.parametrize("which", ["all", "one"])
def test_an_all_black_mask_is_one_line_naming_it(tmp_path, cli, which):
    folder = photos(tmp_path)
    first = sorted(folder.glob("*.jpg"))[0]
    for p in sorted(folder.glob("*.jpg")) if which == "all" else [first]:
        Image.new("L", (64, 64), 0).save(p.with_name(p.stem + ".mask.png"))
    line = refused(cli, tmp_path, folder, first.with_name(first.stem + ".mask.png"))
    assert "black" in line


def test_a_fully_transparent_photo_as_its_own_mask_is_one_line(tmp_path):
    """--alpha-mask on a PNG transparent everywhere: its mask trains on nothing; the line names the
    photo and the flag."""
    from personalize.data import load_masks

    Image.new("RGBA", (16, 16), (200, 10, 10, 0)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match=r"a\.png: its alpha channel \(--alpha-mask\).*black everywhere"):
        load_masks([tmp_path / "a.png"], 16, alpha=True)


def test_a_mask_black_in_the_trained_crop_is_one_line(tmp_path, cli):
    """White only outside the centre crop the photo is trained on: it trains on nothing either."""
    folder = tmp_path / "wide"
    folder.mkdir()
    write_photos(folder, n=2, size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(folder / "w.png")
    m = np.zeros((64, 128), np.uint8)
    m[:, :16] = 255  # the left edge only: cropped away at 64 px
    Image.fromarray(m).save(folder / "w.mask.png")
    line = refused(cli, tmp_path, folder, folder / "w.mask.png")
    assert "crop" in line


def test_a_mask_for_a_missing_photo_is_one_line_naming_it(tmp_path, cli):
    folder = photos(tmp_path)
    Image.new("L", (64, 64), 255).save(folder / "gone.mask.png")
    refused(cli, tmp_path, folder, folder / "gone.mask.png")


def test_a_mask_of_another_size_is_one_line_naming_it(tmp_path, cli):
    folder = photos(tmp_path)
    Image.new("L", (32, 32), 255).save(folder / "00.mask.png")
    refused(cli, tmp_path, folder, folder / "00.mask.png")


@pytest.mark.parametrize("damage", ["garbage", "empty", "bomb", "folder", "dangling-symlink"])
def test_a_damaged_mask_is_one_line_naming_it(tmp_path, cli, damage):
    folder = photos(tmp_path)
    if damage == "folder":
        (folder / "00.mask.png").mkdir()
    elif damage == "dangling-symlink":
        (folder / "00.mask.png").symlink_to(tmp_path / "nowhere.png")
    else:
        data = {"garbage": b"not a png", "empty": b"", "bomb": png_header(30000, 30000)}[damage]
        (folder / "00.mask.png").write_bytes(data)
    refused(cli, tmp_path, folder, folder / "00.mask.png")


# ---------------------------------------------------------------------------- photos
def test_a_decompression_bomb_photo_is_one_line_naming_it(tmp_path, cli):
    folder = photos(tmp_path)
    (folder / "bomb.png").write_bytes(png_header(30000, 30000))
    line = refused(cli, tmp_path, folder, folder / "bomb.png")
    assert "900000000 pixels" in line  # 30000 x 30000


def test_a_big_photo_header_prints_no_warning_besides_the_line(tmp_path, cli):
    """Between PIL's warning and error limits: still the one line (truncated), no DecompressionBombWarning."""
    folder = photos(tmp_path)
    (folder / "big.png").write_bytes(png_header(13000, 13000))
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        refused(cli, tmp_path, folder, folder / "big.png")
    assert not [w for w in seen if "decompression" in str(w.message).lower()]


@pytest.mark.parametrize("make, culprit, fragment", [
    (lambda f: None, lambda f: f, "no images"),  # an empty folder
    (lambda f: [(f / "a.txt").write_text("x"), (f / "b.heic").write_bytes(b"\0" * 10)], lambda f: f, "no images"),
    (lambda f: (f / "00.jpg").write_bytes(b""), lambda f: f / "00.jpg", "unreadable"),
    (lambda f: (f / "00.jpg").write_bytes((f / "01.jpg").read_bytes()[:300]), lambda f: f / "00.jpg", "unreadable"),
    (lambda f: Image.new("RGB", (1, 1)).save(f / "00.png"), lambda f: f / "00.png", "smaller than --resolution"),
    (lambda f: (f / "zz.jpg").symlink_to(f.parent / "nowhere.jpg"), lambda f: f / "zz.jpg", "broken symlink"),
], ids=["empty", "only-non-images", "zero-byte", "truncated", "1x1", "dangling-symlink"])
def test_hostile_photo_folders_are_one_line(tmp_path, cli, make, culprit, fragment):
    folder = tmp_path / "dog"
    folder.mkdir()
    if fragment not in ("no images",):
        write_photos(folder, n=2, size=(64, 64))
    make(folder)
    assert fragment in refused(cli, tmp_path, folder, culprit(folder))


# ---------------------------------------------------------------------------- captions
def test_a_caption_txt_not_utf8_is_one_line_naming_it(tmp_path, cli):
    folder = photos(tmp_path)
    (folder / "00.txt").write_bytes(b"a \xff\xfe sks dog \x80")
    refused(cli, tmp_path, folder, folder / "00.txt")


def test_a_metadata_jsonl_not_utf8_is_one_line_naming_it(tmp_path, cli):
    folder = photos(tmp_path)
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "00.jpg", "text": "a \xff sks dog"}\n')
    refused(cli, tmp_path, folder, folder / "metadata.jsonl")


def test_a_metadata_line_for_a_missing_photo_is_one_line(tmp_path, cli):
    folder = photos(tmp_path)
    rows = [{"file_name": "00.jpg", "text": "a {token} {class}"}, {"file_name": "gone.jpg", "text": "x"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = refused(cli, tmp_path, folder, folder / "metadata.jsonl")
    assert "gone.jpg" in line


def test_a_caption_for_a_missing_photo_is_one_line_naming_it(tmp_path, cli):
    """Captions beside the photos, one of them captioning no photo (renamed, deleted, a format not
    read): that photo trains on the instance prompt instead, silently, unless refused."""
    folder = photos(tmp_path)
    (folder / "00.txt").write_text("a {token} {class} asleep")
    (folder / "gone.txt").write_text("a {token} {class} running")
    refused(cli, tmp_path, folder, folder / "gone.txt")


def test_a_caption_of_a_photo_in_a_format_not_read_is_one_line(tmp_path, cli):
    folder = photos(tmp_path)
    (folder / "phone.heic").write_bytes(b"\0" * 16)
    (folder / "phone.txt").write_text("a {token} {class} on a sofa")
    line = refused(cli, tmp_path, folder, folder / "phone.txt")
    assert "phone.heic" in line


def test_caption_encodings_that_are_valid_read_as_written(tmp_path):
    """A UTF-8 BOM (Notepad) is not part of the caption; non-ASCII text is kept; a stray notes.txt
    in a folder without captions is not a caption."""
    from personalize.data import read_captions

    folder = photos(tmp_path)
    a, b, c = sorted(folder.glob("*.jpg"))
    (folder / "00.txt").write_bytes("\ufeffa {token} {class} at the café".encode())
    (folder / "metadata.jsonl").write_bytes(("\ufeff" + json.dumps({"file_name": "01.jpg", "text": "naïve {class}"},
                                                                     ensure_ascii=False) + "\n").encode())
    assert read_captions([a, b, c]) == ["a {token} {class} at the café", "naïve {class}", None]
    other = photos(tmp_path, "cat")
    (other / "notes.txt").write_text("shot on my phone, 2024")
    assert read_captions(sorted(other.glob("*.jpg"))) == [None, None, None]


def test_a_caption_that_is_not_a_file_is_one_line(tmp_path):
    from personalize.data import read_captions

    folder = photos(tmp_path)
    (folder / "00.txt").mkdir()
    with pytest.raises(UserError, match="00.txt"):
        read_captions(sorted(folder.glob("*.jpg")))


# ---------------------------------------------------------------------------- odd but valid: it trains
@pytest.mark.slow
def test_odd_but_valid_inputs_train(tmp_path, cli):
    """One folder of everything odd that is still valid: a CMYK JPEG, a 16-bit PNG, a photo
    symlinked from elsewhere, a 1x1 photo with --allow-upscale, a palette mask, an LA mask, a
    caption with a BOM and non-ASCII text, a notes file beside them."""
    folder = tmp_path / "odd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (64, 64)).astype(np.uint16)).save(folder / "deep.png")
    elsewhere = write_photos(tmp_path / "elsewhere", n=1, size=(64, 64))
    (folder / "linked.jpg").symlink_to(elsewhere / "00.jpg")
    Image.new("RGB", (1, 1), "blue").save(folder / "dot.png")
    _mask_in_mode(255, "P", (64, 64)).save(folder / "cmyk.mask.png")
    _mask_in_mode(200, "LA", (64, 64)).save(folder / "deep.mask.png")
    (folder / "linked.txt").write_bytes("\ufeffa {token} {class}, café".encode())
    (folder / "README.md").write_text("my dog")
    before = snapshot(folder)
    r = cli("lora", "--subject", folder, "--class-noun", "dog", *QUICK, "--allow-upscale", "--output-dir",
            tmp_path / "run")
    assert r.code == 0, r.err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert snapshot(folder) == before
