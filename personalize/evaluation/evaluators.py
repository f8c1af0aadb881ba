"""Frozen feature extractors for the DreamBooth §4.1 metrics: DINO ViT-S/16 CLS embeddings and
CLIP image / text embeddings.

Weights resolve offline-first: a local directory, else the HF cache (never the network), else
the hub only when `HF_HUB_OFFLINE` is not set. Only safetensors weights are read. There is no
module-level cache: the caller builds each embedder once and passes it around, so a process that
scores many runs loads each model once.

Preprocessing uses transformers' PIL-backed image processors configured from the model's own
`preprocessor_config.json` (no torchvision): DINO is resized to 224x224 (bilinear, ImageNet
mean/std), CLIP's shorter side is resized to 224 (bicubic) then center-cropped. The explicit PIL
classes keep the numbers identical on machines that do have torchvision installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image

from ..backbones import hub_offline
from ..defaults import DEFAULT_CLIP, DEFAULT_DINO  # noqa: F401 - re-exported
from ..errors import UserError

# Hub repos whose main branch holds only pickled weights; the revision that adds model.safetensors
# (the Hub's SFconvertbot PR, never merged for dino-vits16).
SAFETENSORS_REVISIONS: dict[str, str] = {"facebook/dino-vits16": "refs/pr/1"}

# configs, tokenizer files and safetensors weights: skips .bin/.h5/.msgpack duplicates on download
_ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]

ImageLike = Image.Image | str | Path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user passed (hub id or path)
    path: Path  # local directory with config.json + safetensors weights
    source: str  # "local" | "hf-cache" | "hub-download"


def _has_safetensors(d: Path) -> bool:
    return (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()


def _looks_like_path(name: str) -> bool:
    # hub ids are "owner/name": one slash, no leading ./ ~ or /
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name


def resolve_model(name: str, *, what: str, flag: str, needs: Sequence[str] = ()) -> ResolvedModel:
    """Local directory for evaluator `name` (hub id or path), or a one-line UserError saying how to
    pass a local path with `flag`. `needs` are extra files the directory must hold (tokenizer...)."""
    layout = f"a directory with config.json, model.safetensors{''.join(', ' + n for n in needs)}"
    fix = f"pass {layout} with {flag} PATH"
    p = Path(name).expanduser()
    if p.exists() or _looks_like_path(name):
        if not p.is_dir():
            raise UserError(f"{flag} {name}: no such directory ({what} evaluator); {fix}")
        problem = _layout_problem(p, needs)
        if problem:
            raise UserError(f"{flag} {name}: {problem}; {fix} (only safetensors weights are loaded)")
        return ResolvedModel(name, p.resolve(), "local")

    from huggingface_hub import snapshot_download

    revision = SAFETENSORS_REVISIONS.get(name)
    try:
        cached = Path(snapshot_download(name, revision=revision, allow_patterns=_ALLOW_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached / partial cache: both mean "not available locally"
        cached = None
    if cached is not None and not _layout_problem(cached, needs):
        return ResolvedModel(name, cached, "hf-cache")
    if hub_offline():
        raise UserError(f"{what} evaluator '{name}' is not in the HF cache and HF_HUB_OFFLINE is set; "
                        f"download it where there is network (`hf download {name}`) or {fix}")
    try:
        downloaded = Path(snapshot_download(name, revision=revision, allow_patterns=_ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, auth, unknown repo: the same fix for the user
        raise UserError(f"{what} evaluator '{name}' is not in the HF cache and the hub failed "
                        f"({type(e).__name__}); {fix}") from None
    problem = _layout_problem(downloaded, needs)
    if problem:
        raise UserError(f"{what} evaluator '{name}' downloaded but {problem}; {fix}")
    return ResolvedModel(name, downloaded, "hub-download")


def _layout_problem(d: Path, needs: Sequence[str]) -> str | None:
    if not (d / "config.json").is_file():
        return "no config.json"
    if not _has_safetensors(d):
        return "no model.safetensors"
    missing = [n for n in needs if not (d / n).is_file()]
    if missing:
        return f"no {' / '.join(missing)}"
    return None


def _tokenizer_files(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def _load_image(img: ImageLike) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    from ..data import open_image  # EXIF orientation + alpha on white, like the training photos

    return open_image(Path(img))


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class _Embedder:
    """Shared plumbing: device, batching, preprocessing with the model's image processor."""

    what = "evaluator"

    def __init__(self, name: str, model: torch.nn.Module, processor, device: torch.device, batch_size: int,
                 source: str = "in-memory") -> None:
        if batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.name = name
        self.source = source
        self.device = device
        self.batch_size = batch_size
        self.processor = processor
        self.model = model.to(device).eval().requires_grad_(False)

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """[n, 3, H, W] float32 pixel values on the CPU, exactly what the model is fed."""
        pil = [_load_image(im) for im in images]
        return self.processor(images=pil, return_tensors="pt")["pixel_values"].to(torch.float32)

    def _forward_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embeddings ([n, d], float32, CPU, not normalised) of preprocessed pixel values."""
        out = []
        with torch.inference_mode():
            for chunk in _batches(pixel_values, self.batch_size):
                out.append(self._forward_pixels(chunk.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    def embed_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Embeddings of images (PIL or paths), read and preprocessed one batch at a time so that
        3,000 protocol images never sit decoded in memory together."""
        out = [self.embed_pixels(self.preprocess(chunk)) for chunk in _batches(list(images), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, 0)


class DinoEmbedder(_Embedder):
    """DINO ViT (default `facebook/dino-vits16`, the DreamBooth paper's ViT-S/16): the CLS token of
    the last hidden state (after the final LayerNorm), as DINO's own `forward` returns it."""

    what = "DINO"

    @classmethod
    def from_name_or_path(cls, name: str = DEFAULT_DINO, device: str | torch.device | None = None,
                          batch_size: int = 32) -> "DinoEmbedder":
        from transformers import ViTModel
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        resolved = resolve_model(name, what=cls.what, flag="--dino")
        try:
            # the pooler is a fine-tuning head, not part of DINO; the CLS token is the embedding
            model = ViTModel.from_pretrained(resolved.path, use_safetensors=True, local_files_only=True,
                                             add_pooling_layer=False)
        except (OSError, ValueError) as e:
            raise UserError(f"DINO evaluator '{name}' could not be loaded from {resolved.path} "
                            f"({type(e).__name__}); pass a ViT directory with --dino PATH") from None
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        size = model.config.image_size
        # DINO was trained with ImageNet mean/std (the processor class's default is 0.5/0.5)
        processor = _image_processor(ViTImageProcessorPil, resolved.path, size={"height": size, "width": size},
                                     image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
        return cls(name, model, processor, torch.device(device) if device else default_device(), batch_size,
                   resolved.source)

    def _forward_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class ClipEmbedder(_Embedder):
    """CLIP (default `openai/clip-vit-base-patch32`): projected image embeddings for CLIP-I and
    CLIP-T, projected text embeddings for CLIP-T. In transformers 5, `get_image_features` /
    `get_text_features` return a model output whose `pooler_output` is the projected embedding."""

    what = "CLIP"

    def __init__(self, name: str, model: torch.nn.Module, processor, tokenizer, device: torch.device,
                 batch_size: int, source: str = "in-memory") -> None:
        super().__init__(name, model, processor, device, batch_size, source)
        self.tokenizer = tokenizer

    @classmethod
    def from_name_or_path(cls, name: str = DEFAULT_CLIP, device: str | torch.device | None = None,
                          batch_size: int = 32) -> "ClipEmbedder":
        from transformers import AutoTokenizer, CLIPModel
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        resolved = resolve_model(name, what=cls.what, flag="--clip")
        if not _tokenizer_files(resolved.path):
            raise UserError(f"CLIP evaluator '{name}' has no tokenizer (tokenizer.json or vocab.json + merges.txt) "
                            f"in {resolved.path}; pass a full CLIP directory with --clip PATH")
        try:
            model = CLIPModel.from_pretrained(resolved.path, use_safetensors=True, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"CLIP evaluator '{name}' could not be loaded from {resolved.path} "
                            f"({type(e).__name__}); pass a CLIP directory with --clip PATH") from None
        size = model.config.vision_config.image_size
        processor = _image_processor(CLIPImageProcessorPil, resolved.path, size={"shortest_edge": size},
                                     crop_size={"height": size, "width": size})
        return cls(name, model, processor, tokenizer, torch.device(device) if device else default_device(),
                   batch_size, resolved.source)

    def _forward_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _projected(self.model.get_image_features(pixel_values=pixel_values))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids as CLIP was trained: padded, truncated at the text encoder's 77 positions."""
        max_len = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings ([n, d], float32, CPU, not normalised)."""
        out = []
        with torch.inference_mode():
            for chunk in _batches(list(texts), self.batch_size):
                enc = {k: v.to(self.device) for k, v in self.tokenize(chunk).items()}
                out.append(_projected(self.model.get_text_features(**enc)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)


def _projected(out) -> torch.Tensor:
    # transformers 5: BaseModelOutputWithPooling with the projection in pooler_output;
    # transformers 4: the tensor itself. Accept both so a pinned older install still scores.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _image_processor(cls, path: Path, **defaults):
    """The model's own preprocessing when it ships a preprocessor_config.json, else the standard
    one for its input size (a bare local checkpoint)."""
    if (path / "preprocessor_config.json").is_file():
        return cls.from_pretrained(path, local_files_only=True)
    return cls(**defaults)
