"""DreamBooth §4.1 metrics: pure functions on embeddings, and the evaluators that produce them
(tiny random-weight DINO-shaped ViT and CLIP built in code, loaded from safetensors dirs)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from _metric_fixtures import _one_torch_thread, embedders, random_image, tiny_model_dirs  # noqa: F401 - fixtures

from personalize.errors import UserError
from personalize.evaluation.metrics import (
    clip_t,
    cosine_matrix,
    l2_normalize,
    mean_cosine_to_set,
    mean_pairwise_cosine,
    mean_real_vs_real,
    nanmean,
    real_vs_real,
    strip_identifier,
)


# ------------------------------------------------------------------ pure functions
def test_l2_normalize_unit_rows_and_zero_row_stays_finite():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    n = l2_normalize(x)
    assert n.dtype == torch.float64
    assert torch.allclose(n[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert torch.equal(n[1], torch.zeros(2, dtype=torch.float64))


def test_self_score_is_one_on_embeddings():
    x = torch.randn(1, 24)
    assert mean_pairwise_cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    # scale does not matter: cosine, not dot product
    assert mean_pairwise_cosine(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)


def test_pairwise_mean_is_permutation_invariant_and_matches_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)
    ref = sum(torch.nn.functional.cosine_similarity(a[i:i + 1].double(), b[j:j + 1].double()).item()
              for i in range(5) for j in range(3)) / 15
    assert mean_pairwise_cosine(a, b) == pytest.approx(ref, abs=1e-12)
    pa, pb = torch.randperm(5, generator=g), torch.randperm(3, generator=g)
    assert mean_pairwise_cosine(a[pa], b[pb]) == pytest.approx(ref, abs=1e-12)
    # per-generated-image scores follow their image under permutation
    assert torch.allclose(mean_cosine_to_set(a[pa], b[pb]), mean_cosine_to_set(a, b)[pa])


def test_real_vs_real_excludes_self_pairs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g)
    n = x.shape[0]
    hand = [sum(torch.nn.functional.cosine_similarity(x[i:i + 1].double(), x[j:j + 1].double()).item()
                for j in range(n) if j != i) / (n - 1) for i in range(n)]
    got = real_vs_real(x)
    assert got.tolist() == pytest.approx(hand, abs=1e-12)
    assert mean_real_vs_real(x) == pytest.approx(sum(hand) / n, abs=1e-12)
    with_self = float(cosine_matrix(x, x).mean())  # what a naive implementation would report
    assert mean_real_vs_real(x) != pytest.approx(with_self, abs=1e-6)


def test_real_vs_real_with_one_image_is_undefined_not_one():
    x = torch.randn(1, 6)
    assert math.isnan(real_vs_real(x)[0].item())
    assert math.isnan(mean_real_vs_real(x))
    assert real_vs_real(torch.randn(2, 6)).shape == (2,)


def test_clip_t_is_rowwise_cosine():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert clip_t(img, txt).tolist() == pytest.approx([1 / math.sqrt(2), -1.0])
    with pytest.raises(ValueError):
        clip_t(img, txt[:1])


def test_shape_errors():
    with pytest.raises(ValueError, match="sizes differ"):
        mean_pairwise_cosine(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="empty"):
        mean_pairwise_cosine(torch.randn(0, 4), torch.randn(2, 4))


@pytest.mark.parametrize("prompt,token,expected", [
    ("a sks dog in the snow", "sks", "a dog in the snow"),
    ("a red sks backpack", "sks", "a red backpack"),
    ("a cube shaped sks toy", "sks", "a cube shaped toy"),
    ("sks dog", "sks", "dog"),
    ("a sksx dog", "sks", "a sksx dog"),  # only whole words
    ("a photo of <new1> cat", "<new1>", "a photo of cat"),
    ("a dog", "", "a dog"),
])
def test_strip_identifier(prompt, token, expected):
    assert strip_identifier(prompt, token) == expected


def test_nanmean_skips_undefined():
    assert nanmean([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(nanmean([math.nan]))


# ------------------------------------------------------------------ evaluators
def test_image_scored_against_itself_gives_one(embedders):
    dino, clip = embedders
    img = random_image(3)
    for ev in (dino, clip):
        e = ev.embed_images([img])
        assert mean_pairwise_cosine(e, ev.embed_images([img.copy()])) == pytest.approx(1.0, abs=1e-6)


def test_scores_are_permutation_invariant_through_the_evaluators(embedders, monkeypatch):
    dino, clip = embedders
    for ev in (dino, clip):
        monkeypatch.setattr(ev, "batch_size", 4)
    gen = [random_image(s, (40 + s, 36)) for s in range(6)]  # 6 > batch_size 4: crosses a batch edge
    real = [random_image(100 + s) for s in range(3)]
    for ev in (dino, clip):
        ref = mean_pairwise_cosine(ev.embed_images(gen), ev.embed_images(real))
        permuted = mean_pairwise_cosine(ev.embed_images(gen[::-1]), ev.embed_images([real[2], real[0], real[1]]))
        assert permuted == pytest.approx(ref, abs=1e-6)


def test_pairwise_mean_equals_plain_transformers_calls(embedders, tiny_model_dirs):
    from transformers import CLIPModel, ViTModel

    dino, clip = embedders
    gen = [random_image(s) for s in range(5)]
    real = [random_image(50 + s, (64, 48)) for s in range(3)]

    def direct_mean(a: torch.Tensor, b: torch.Tensor) -> float:
        f = torch.nn.functional
        return sum(f.cosine_similarity(a[i], b[j], dim=0).item() for i in range(len(a)) for j in range(len(b))) / (
            len(a) * len(b))

    vit = ViTModel.from_pretrained(tiny_model_dirs["dino"], add_pooling_layer=False).eval()
    clip_model = CLIPModel.from_pretrained(tiny_model_dirs["clip"]).eval()
    with torch.no_grad():
        d_gen = vit(pixel_values=dino.preprocess(gen)).last_hidden_state[:, 0]
        d_real = vit(pixel_values=dino.preprocess(real)).last_hidden_state[:, 0]
        c_gen = clip_model.get_image_features(pixel_values=clip.preprocess(gen)).pooler_output
        c_real = clip_model.get_image_features(pixel_values=clip.preprocess(real)).pooler_output

    assert mean_pairwise_cosine(dino.embed_images(gen), dino.embed_images(real)) == pytest.approx(
        direct_mean(d_gen, d_real), abs=1e-5)
    assert mean_pairwise_cosine(clip.embed_images(gen), clip.embed_images(real)) == pytest.approx(
        direct_mean(c_gen, c_real), abs=1e-5)


def test_preprocessing_is_the_models_own(embedders):
    """DINO: resize to the model size, ImageNet mean/std; CLIP: shorter side + center crop, CLIP mean/std."""
    import numpy as np
    from PIL import Image

    dino, clip = embedders
    img = random_image(7, (64, 40))
    arr = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1))
    assert torch.allclose(dino.preprocess([img])[0].double(), expected, atol=1e-5)
    assert clip.preprocess([img]).shape == (1, 3, 32, 32)
    assert torch.allclose(torch.tensor(clip.processor.image_mean),
                          torch.tensor([0.48145466, 0.4578275, 0.40821073]))


def test_embedder_without_preprocessor_config_uses_dino_defaults(tiny_model_dirs, tmp_path):
    from personalize.evaluation.evaluators import DinoEmbedder

    bare = tmp_path / "dino"
    shutil.copytree(tiny_model_dirs["dino"], bare)
    (bare / "preprocessor_config.json").unlink()
    ev = DinoEmbedder.from_name_or_path(str(bare), device="cpu")
    assert tuple(ev.processor.image_mean) == pytest.approx((0.485, 0.456, 0.406))
    assert ev.preprocess([random_image(1)]).shape == (1, 3, 32, 32)


def test_clip_t_text_embedding_matches_plain_calls(embedders, tiny_model_dirs):
    from transformers import AutoTokenizer, CLIPModel

    _, clip = embedders
    model = CLIPModel.from_pretrained(tiny_model_dirs["clip"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["clip"])
    texts = ["a dog in the snow", "a red backpack"]
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        direct = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    assert torch.allclose(clip.embed_texts(texts), direct, atol=1e-5)


# ------------------------------------------------------------------ loading failures
def test_missing_evaluator_offline_is_one_line_naming_model(monkeypatch):
    from personalize.evaluation.evaluators import ClipEmbedder, DinoEmbedder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        DinoEmbedder.from_name_or_path("no-such-org/dino-missing", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "no-such-org/dino-missing" in msg and "--dino PATH" in msg
    with pytest.raises(UserError) as e:
        ClipEmbedder.from_name_or_path("no-such-org/clip-missing", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "no-such-org/clip-missing" in msg and "--clip PATH" in msg


def test_local_path_problems_are_user_errors(tmp_path, tiny_model_dirs):
    from personalize.evaluation.evaluators import ClipEmbedder, DinoEmbedder

    with pytest.raises(UserError, match="--dino .*no such directory"):
        DinoEmbedder.from_name_or_path(str(tmp_path / "nope"), device="cpu")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dirs["dino"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="no model.safetensors"):
        DinoEmbedder.from_name_or_path(str(pickled), device="cpu")
    no_tok = tmp_path / "clip"
    shutil.copytree(tiny_model_dirs["clip"], no_tok)
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        (no_tok / f).unlink(missing_ok=True)
    with pytest.raises(UserError, match="tokenizer"):
        ClipEmbedder.from_name_or_path(str(no_tok), device="cpu")
