from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.data import load_training_images, open_image, resize_center_crop, to_rgb, to_tensor, with_flips
from personalize.errors import UserError


def test_transparent_pixels_become_white_not_black():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    out = to_rgb(Image.fromarray(arr))
    assert out.mode == "RGB" and abs(out.getpixel((0, 0))[0] - 128) <= 1


def test_palette_and_cmyk_become_rgb():
    assert to_rgb(Image.new("P", (2, 2))).mode == "RGB"
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB"


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (20, 40)


def test_resize_center_crop_and_range():
    img = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (50, 1, 3)))
    out = resize_center_crop(img, 32)
    assert out.size == (32, 32)
    t = to_tensor(out)
    assert t.shape == (3, 32, 32) and t.min() >= -1 and t.max() <= 1


def test_flips_double_and_mirror():
    x = torch.arange(8.0).reshape(1, 1, 2, 4).expand(1, 3, 2, 4)
    f = with_flips(x)
    assert f.shape[0] == 2 and torch.equal(f[1], x[0].flip(-1))


def test_small_image_refused_unless_upscale(tmp_path):
    Image.new("RGB", (20, 30)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="a.png: image is 20x30"):
        load_training_images([tmp_path / "a.png"], 32)
    assert load_training_images([tmp_path / "a.png"], 32, allow_upscale=True).shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------- captions and masks
def _photo(folder, name, size=(16, 16), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (200, 10, 10, 255) if mode == "RGBA" else (200, 10, 10)).save(folder / name)
    return folder / name


def test_captions_from_a_txt_beside_the_photo_or_metadata_jsonl(tmp_path):
    import json

    from personalize.data import read_captions

    a, b, c = _photo(tmp_path, "a.jpg"), _photo(tmp_path, "b.jpg"), _photo(tmp_path, "c.jpg")
    (tmp_path / "a.txt").write_text("a photo of {token} {class}\n on grass ")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.jpg", "text": "{token} {class} asleep"}) + "\n"
                                             + json.dumps({"file_name": "a.jpg", "text": "loses to a.txt"}) + "\n")
    assert read_captions([a, b, c]) == ["a photo of {token} {class} on grass", "{token} {class} asleep", None]


@pytest.mark.parametrize("name, text, msg", [("a.txt", "  \n", "empty caption"),
                                             ("metadata.jsonl", "{not json", "metadata.jsonl:1: not a JSON object")])
def test_bad_captions_are_one_line(tmp_path, name, text, msg):
    from personalize.data import read_captions

    a = _photo(tmp_path, "a.jpg")
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=msg):
        read_captions([a])


def test_mask_file_and_alpha_masks(tmp_path):
    from personalize.data import latent_masks, load_masks
    from personalize.subjects import list_images

    a, b = _photo(tmp_path, "a.jpg"), _photo(tmp_path, "b.png", mode="RGBA")
    assert load_masks([a, b], 16) is None  # no mask anywhere: the unmasked loss, exactly
    m = np.zeros((16, 16), np.uint8)
    m[:, :8] = 255  # the left half is the subject
    Image.fromarray(m).save(tmp_path / "a.mask.png")
    assert list_images(tmp_path) == [a, b]  # a mask is not a training photo
    masks = load_masks([a, b], 16)
    assert masks.shape == (2, 1, 16, 16)
    assert masks[0, 0, :, :8].eq(1).all() and masks[0, 0, :, 8:].eq(0).all() and masks[1].eq(1).all()
    lat = latent_masks(masks, (2, 2))  # 8x8 patches: area averages
    assert lat[0, 0].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    # alpha only with --alpha-mask: a transparent PNG
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 0
    rgba[:8, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(b)
    assert load_masks([b], 16) is None
    assert load_masks([b], 16, alpha=True)[0, 0, :8].eq(1).all()
    assert load_masks([b], 16, alpha=True)[0, 0, 8:].eq(0).all()


def test_a_mask_of_another_size_is_one_line(tmp_path):
    from personalize.data import load_masks

    a = _photo(tmp_path, "a.jpg")
    Image.new("L", (8, 8), 255).save(tmp_path / "a.mask.png")
    with pytest.raises(UserError, match="a mask must match its photo's size"):
        load_masks([a], 16)


def _own_photos(folder, n=3):
    from conftest import write_photos

    return write_photos(folder, n=n, size=(64, 64))


@pytest.mark.slow
def test_a_zero_mask_gives_zero_instance_loss_in_a_run(tmp_path, cli, monkeypatch):
    """The masks reach the loss. An all-black mask file is refused up front (it trains on nothing:
    test_hostile_training.py), so zero masks are handed to the run past that check."""
    import json

    from conftest import FAST

    import personalize.prepare as prepare

    photos = _own_photos(tmp_path / "dog")
    monkeypatch.setattr(prepare, "load_masks", lambda paths, res, alpha=False: torch.zeros(len(paths), 1, res, res))
    r = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--class-images", "0",
            "--validation-images", "0", "--output-dir", tmp_path / "r")
    assert r.code == 0, r.err
    losses = json.loads((tmp_path / "r" / "run.json").read_text())["stats"]["final_losses"]
    assert losses["loss_instance"] == 0.0 and losses["loss"] == 0.0


@pytest.mark.slow
def test_captions_reach_the_text_encoder_once_per_distinct_caption(tmp_path, cli, monkeypatch):
    from conftest import FAST
    from transformers import CLIPTextModel

    photos = _own_photos(tmp_path / "dog")
    first, second, third = sorted(photos.glob("*.jpg"))
    first.with_suffix(".txt").write_text("a {token} {class} asleep")
    second.with_suffix(".txt").write_text("a {token} {class} asleep")  # the same caption: one cache entry
    seen = []
    real = CLIPTextModel.forward

    def recording(self, input_ids=None, *a, **k):
        seen.append(input_ids.clone())
        return real(self, input_ids, *a, **k)

    monkeypatch.setattr(CLIPTextModel, "forward", recording)
    r = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--class-images", "0",
            "--validation-images", "0", "--no-train-text-encoder", "--output-dir", tmp_path / "r")
    assert r.code == 0, r.err
    from personalize.sources import load_components
    from personalize.backbones import materialize_tiny

    tok = load_components(materialize_tiny(0))["tokenizer"]
    captions = {tok.decode(row, skip_special_tokens=True) for row in seen[0]}
    # frozen text encoder: the distinct captions (own + the instance prompt for the third photo)
    # embedded once, in one call, then the class prompt: no per-step forwards
    assert captions == {"a sks dog asleep", "a sks dog"} and len(seen) == 2
