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
