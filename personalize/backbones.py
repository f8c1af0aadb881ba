"""Backbone registry: which Stable Diffusion pipelines can be personalized, and where their weights are.

A plain dict of specs (no import-time registration), what the local HF cache holds of them, and the
`tiny` backbone: a random-weight, SD-v1-shaped pipeline built in code from a seed, so the whole
flow runs offline. Turning a `--base` into a local directory is sources.resolve_base.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .fileio import atomic_dir
from .outputs import slug


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    hub_id: str | None
    family: str  # "sd-v1" | "sd-v2": text encoder/VAE family, decides which teacher config applies
    resolution: int  # native training resolution of the backbone
    unet_params_card: str  # U-Net parameter count as stated on the model card ("" when none states it)
    description: str


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("bk-sdm-base", "nota-ai/bk-sdm-base", "sd-v1", 512, "0.58B", "BK-SDM Base, 0.22M LAION pairs"),
        BackboneSpec("bk-sdm-small", "nota-ai/bk-sdm-small", "sd-v1", 512, "0.49B", "BK-SDM Small, 0.22M LAION pairs"),
        BackboneSpec("bk-sdm-tiny", "nota-ai/bk-sdm-tiny", "sd-v1", 512, "0.33B", "BK-SDM Tiny, 0.22M LAION pairs"),
        BackboneSpec("bk-sdm-base-2m", "nota-ai/bk-sdm-base-2m", "sd-v1", 512, "0.58B", "BK-SDM Base, 2.3M LAION pairs"),
        BackboneSpec("bk-sdm-small-2m", "nota-ai/bk-sdm-small-2m", "sd-v1", 512, "0.49B", "BK-SDM Small, 2.3M pairs"),
        BackboneSpec("bk-sdm-tiny-2m", "nota-ai/bk-sdm-tiny-2m", "sd-v1", 512, "0.33B", "BK-SDM Tiny, 2.3M LAION pairs"),
        BackboneSpec("bk-sdm-v2-base", "nota-ai/bk-sdm-v2-base", "sd-v2", 512, "0.58B", "BK-SDM-v2 Base (SD-v2.1-base)"),
        BackboneSpec("bk-sdm-v2-small", "nota-ai/bk-sdm-v2-small", "sd-v2", 512, "0.49B", "BK-SDM-v2 Small"),
        BackboneSpec("bk-sdm-v2-tiny", "nota-ai/bk-sdm-v2-tiny", "sd-v2", 512, "0.33B", "BK-SDM-v2 Tiny"),
        BackboneSpec("sd-v1.4", "CompVis/stable-diffusion-v1-4", "sd-v1", 512, "0.86B", "Stable Diffusion v1.4 (teacher)"),
        BackboneSpec("sd-v2.1-base", "stabilityai/stable-diffusion-2-1-base", "sd-v2", 512, "0.87B", "SD v2.1-base"),
        BackboneSpec("small-sd-v0", "OFA-Sys/small-stable-diffusion-v0", "sd-v1", 512, "", "OFA-Sys Small SD v0"),
        BackboneSpec("tiny", None, "sd-v1", 64, "", "random weights built in code (tests, smoke runs)"),
    ]
}

# Only what a diffusers pipeline needs; keeps a first download from pulling .ckpt/.bin duplicates.
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors"]


@dataclass(frozen=True)
class ResolvedBase:
    name: str  # registry name, or the path/hub id the user gave
    path: Path  # local diffusers pipeline directory
    hub_id: str | None
    source: str  # "registry-cache" | "hub-download" | "local" | "built-in"

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "hub_id": self.hub_id, "source": self.source}

    @property
    def key(self) -> str:
        """A stable cache name: the base's name plus a hash of where its weights live (hub
        snapshots carry the revision in their path, local dirs their absolute path)."""
        return f"{slug(self.name).lower()[:40]}-{hashlib.sha1(str(self.path).encode()).hexdigest()[:8]}"


def cache_root() -> Path:
    """Where personalize keeps its own caches (built backbones, class images)."""
    return Path(os.environ.get("PERSONALIZE_CACHE", Path.home() / ".cache" / "personalize")).expanduser()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def is_pipeline_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "unet").is_dir()


def local_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot of `hub_id` if the HF cache holds it; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        p = Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=HUB_PATTERNS))
    except Exception:  # noqa: BLE001 - any miss (not cached, partial) means "not available locally"
        return None
    return p if is_pipeline_dir(p) else None


def native_resolution(base_path: Path) -> int:
    """U-Net sample size x VAE downsampling factor (512 for SD-v1/BK-SDM, 64 for `tiny`)."""
    unet = json.loads((Path(base_path) / "unet" / "config.json").read_text())
    vae = json.loads((Path(base_path) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def unet_param_count(pipeline_dir: Path) -> int | None:
    """U-Net parameter count read from the safetensors headers (shapes only: no torch, no weights
    read), so `personalize backbones` answers at once. None when the weights are not safetensors."""
    files = sorted((Path(pipeline_dir) / "unet").glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
    return total


# --------------------------------------------------------------------------------------------
# The built-in `tiny` backbone
# --------------------------------------------------------------------------------------------
TINY_VERSION = 1  # bump when the architecture below changes, so stale caches are rebuilt


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary with no merges: every byte (as CLIP's byte->unicode map) and its
    end-of-word form. Tokenizes any text, character by character, with no download."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_tiny_components(seed: int = 0) -> dict:
    """Random-weight SD-v1-shaped components: 4-stage U-Net (3 cross-attn + 1 plain down stage,
    mirrored up), 8x VAE, CLIP text encoder, CLIP BPE tokenizer, DDPM scheduler with SD's betas."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = _byte_level_vocab()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=77)

    torch.manual_seed(seed)  # the diffusers/transformers initialisers draw from the global RNG
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            projection_dim=32,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )
    return {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
        "safety_checker": None, "feature_extractor": None,
    }


def build_tiny_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**build_tiny_components(seed), requires_safety_checker=False)


def materialize_tiny(seed: int = 0) -> Path:
    """Save the tiny pipeline once per (seed, version) into the cache so that runs on it load with
    plain diffusers `from_pretrained` like any other base."""
    out = cache_root() / "backbones" / f"tiny-seed{seed}-v{TINY_VERSION}"
    if is_pipeline_dir(out):
        return out

    try:
        from .pipeline import save_pretrained

        with atomic_dir(out) as tmp:
            save_pretrained(build_tiny_pipeline(seed), tmp)
    except OSError:  # another process won the race; theirs is identical
        if not is_pipeline_dir(out):
            raise
    return out
