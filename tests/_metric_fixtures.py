"""Tiny random-weight evaluators for the scoring tests, built in code (no download).

A DINO-shaped ViT (CLS token of the last hidden state) and a CLIP model with the byte-level CLIP
BPE tokenizer of `personalize.backbones`, each saved with `save_pretrained` (safetensors) plus a
preprocessor config into a temp dir, so the tests load them through `from_name_or_path` like
real evaluators. Imported by test_metrics.py and test_evaluation.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGE_SIZE = 32


def build_tiny_dino(out: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTModel
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=IMAGENET_DEFAULT_MEAN,
                         image_std=IMAGENET_DEFAULT_STD).save_pretrained(out)
    return out


def build_tiny_clip(out: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from personalize.backbones import _byte_level_vocab

    vocab = _byte_level_vocab()
    (out / "vocab.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    torch.manual_seed(1)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    return out


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth random picture (blobs, not white noise) so embeddings differ meaningfully."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def write_images(folder: Path, seeds: list[int], prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        p = folder / f"{prefix}{s:03d}.png"
        random_image(s).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluators")
    return {"dino": build_tiny_dino(root / "dino"), "clip": build_tiny_clip(root / "clip")}


@pytest.fixture(scope="session")
def embedders(tiny_model_dirs):
    from personalize.evaluation.evaluators import ClipEmbedder, DinoEmbedder

    dino = DinoEmbedder.from_name_or_path(str(tiny_model_dirs["dino"]), device="cpu", batch_size=16)
    clip = ClipEmbedder.from_name_or_path(str(tiny_model_dirs["clip"]), device="cpu", batch_size=16)
    return dino, clip


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: thread start-up and contention (2 shared cores) cost 100x the arithmetic, so
    these tests run single-threaded; the previous setting is restored for other test modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
