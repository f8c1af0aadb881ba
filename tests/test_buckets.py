"""--buckets: aspect-ratio buckets (personalize.buckets) and a bucketed run: every photo's bucket
in run.json, batches from one bucket, masks cut like their photos, exact resume with buckets, EMA
and caption dropout and shuffling all on."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FAST, kill_after_checkpoint
from personalize.buckets import (BUCKET_STEP, bucket_sizes, load_bucketed, load_bucketed_masks, nearest_bucket,
                                 place)
from personalize.data import load_masks, load_training_images
from personalize.errors import UserError


def _photo(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8)).save(path)
    return path


def test_buckets_are_multiples_of_64_about_the_area_from_1_2_to_2_1():
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes and (448, 576) in sizes and (576, 448) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and 0.5 <= w / h <= 2 and w * h <= 1.1 * 512 * 512
        assert (h, w) in sizes
    assert bucket_sizes(64) == [(64, 64)]


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_a_photo_is_cropped_by_at_most_about_one_bucket_step(resolution):
    sizes = bucket_sizes(resolution)
    worst = 0
    for i in range(201):
        r = 0.5 * 4 ** (i / 200)  # aspect ratios 1:2 .. 2:1
        at = place(round(4000 * r), 4000, nearest_bucket(round(4000 * r), 4000, sizes))
        worst = max(worst, at.resized[0] - at.bucket[0], at.resized[1] - at.bucket[1])
    assert worst <= BUCKET_STEP + 4


def test_a_3_4_photo_keeps_its_content(tmp_path):
    """A 768x1024 phone photo at 512: bucket 448x576, scaled to 448x597 and 21 px of its height cut
    (96% of the photo kept; a square centre crop keeps 75%)."""
    path = _photo(tmp_path / "phone.jpg", 768, 1024)
    images, (at,) = load_bucketed([path], 512)
    assert at.bucket == (448, 576) and at.resized == (448, 597) and at.box == (0, 10, 448, 586)
    assert images[0].shape == (3, 576, 448)
    kept = (at.box[2] - at.box[0]) * (at.box[3] - at.box[1]) / (at.resized[0] * at.resized[1])
    assert kept > 0.96
    assert at.to_json() == {"bucket": [448, 576], "resized": [448, 597], "crop": [0, 10, 448, 586]}


def test_a_square_photo_is_cut_as_without_buckets(tmp_path):
    path = _photo(tmp_path / "sq.jpg", 100, 90)
    images, (at,) = load_bucketed([path], 64)
    assert at.bucket == (64, 64)
    assert torch.equal(images[0], load_training_images([path], 64)[0])


def test_a_mask_is_cut_like_its_photo(tmp_path):
    path = _photo(tmp_path / "p.png", 300, 150)
    mask = np.zeros((150, 300), np.uint8)
    mask[:, 150:] = 255  # the right half
    Image.fromarray(mask).save(tmp_path / "p.mask.png")
    _photo(tmp_path / "q.png", 200, 200, seed=1)
    images, placed = load_bucketed([path, tmp_path / "q.png"], 192)
    masks = load_bucketed_masks([path, tmp_path / "q.png"], placed)
    assert [at.bucket for at in placed] == [(256, 128), (192, 192)]
    assert masks[0].shape == (1, 128, 256) and masks[1].shape == (1, 192, 192)
    assert torch.equal(masks[1], torch.ones(1, 192, 192))  # no mask: all ones
    row = masks[0][0, 64]
    assert row[:126].max() < 0.05 and row[130:].min() > 0.95
    assert load_bucketed_masks([tmp_path / "q.png"], placed[1:]) is None


def test_a_photo_smaller_than_its_bucket_is_refused_unless_upscaling(tmp_path):
    path = _photo(tmp_path / "small.jpg", 200, 100)
    with pytest.raises(UserError, match=r"small.jpg: image is 200x100, smaller than its bucket 256x128"):
        load_bucketed([path], 192)
    assert load_bucketed([path], 192, allow_upscale=True)[1][0].bucket == (256, 128)


def _varied_photos(folder):
    """Photos of three aspect ratios (three buckets at 192 px), captions of several parts, a mask."""
    folder.mkdir()
    for i, (w, h) in enumerate([(260, 130), (130, 260), (200, 200), (210, 280)]):
        _photo(folder / f"{i:02d}.png", w, h, seed=i)
        (folder / f"{i:02d}.txt").write_text("a {token} {class}, on grass, red collar, sunny day")
    Image.fromarray(np.full((130, 260), 200, np.uint8)).save(folder / "00.mask.png")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("prior", [[], ["--prior", "base-prediction", "--pivotal", "--ti-lr", "1e-2"]],
                         ids=["class-images", "base-prediction-pivotal"])
def test_buckets_ema_and_caption_options_resume_bit_exactly(prior, tmp_path, cli, monkeypatch):
    """All of --buckets, --ema, --caption-dropout, --shuffle-caption --keep-tokens at once, with
    prior preservation (square class images beside non-square buckets: two U-Net calls), or with
    the frozen base's prediction as the prior and --pivotal (issue 26's six at once):
    interrupted after the checkpoint of step 2 and resumed = uninterrupted, EMA included."""

    photos = _varied_photos(tmp_path / "photos")
    args = ["lora", "--subject", photos, "--class-noun", "dog", *FAST, "--resolution", "192", "--steps", "4",
            "--checkpoint-every", "2", "--validation-images", "0", "--lr", "1e-2", "--buckets", "--ema",
            "--ema-decay", "0.5", "--caption-dropout", "0.3", "--shuffle-caption", "--keep-tokens", "1",
            "--train-batch-size", "2", "--log-every", "1", *prior]
    assert cli(*args, "--output-dir", tmp_path / "a").code == 0
    whole_again = kill_after_checkpoint(monkeypatch, 2)
    assert cli(*args, "--output-dir", tmp_path / "b").code == 130
    whole_again()
    assert cli(*args, "--output-dir", tmp_path / "b", "--resume").code == 0

    a, b = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if prior:  # the new tokens' embeddings (the EMA's), trained in steps 1-2, resumed exactly too
        ea, eb = (load_file(tmp_path / d / "embeddings.safetensors")["clip_l"] for d in "ab")
        assert torch.equal(ea, eb)
    la, lb = ((tmp_path / d / "logs" / "loss.csv").read_text() for d in "ab")
    assert la == lb and len(la.splitlines()) == 5
    assert all(math.isfinite(float(x)) for row in la.splitlines()[1:] for x in row.split(","))
    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    assert {k: v["bucket"] for k, v in meta["buckets"].items()} == {
        "00.png": [256, 128], "01.png": [128, 256], "02.png": [192, 192], "03.png": [192, 192]}
    assert meta["buckets"]["03.png"]["crop"] == [0, 32, 192, 224]
    assert meta["weights"] == "ema (decay 0.5)" and meta["config"]["shuffle_caption"] is True


def test_the_app_trains_uploaded_photos_in_buckets_and_dataset_subjects_square(tmp_path):
    from conftest import write_photos
    from personalize.app.handlers import DATASET, OWN, App

    photos = sorted(write_photos(tmp_path / "up", n=3).iterdir())
    h = App(tmp_path / "ws")
    _, _, cfg = h.make_config("mine", "tiny", OWN, None, photos, "dog", "lora", 4, 64, None, None, False, None, None,
                              False)
    assert cfg.buckets is True
    _, _, cfg = h.make_config("theirs", "tiny", DATASET, "dog", None, "", "lora", 4, 64, None, None, False, None, None,
                              False)
    assert cfg.buckets is False
    off = App(tmp_path / "ws2", train_defaults={"buckets": False})  # a default given to the app wins
    _, _, cfg = off.make_config("mine", "tiny", OWN, None, photos, "dog", "lora", 4, 64, None, None, False, None, None,
                                False)
    assert cfg.buckets is False
