"""LoRA adapters: attach (peft), and save/load in the diffusers format that plain
`pipe.load_lora_weights(run_dir)` reads, with each adapter's rank/alpha in the safetensors
metadata (so alpha != rank, as in the BK-SDM recipe's 16/27, round-trips)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .fileio import move_into, scratch_dir

if TYPE_CHECKING:
    import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers looks for by default


def lora_config(rank: int, alpha: float, targets: list[str]):
    from peft import LoraConfig

    # gaussian init of A (B = 0): the adapter starts as the identity, as in the diffusers scripts
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets),
                      lora_dropout=0.0)


def attach_adapter(model, config, adapter_name: str = "default") -> None:
    """Inject a peft adapter into `model` with peft's own `inject_adapter_in_model`, the call
    diffusers' loaders make. Never through transformers' `PreTrainedModel.add_adapter`: its peft
    version gate is a transformers release's to move (5.24 demanded an unreleased peft and broke
    every text-encoder LoRA), and the adapter we save is peft's state dict either way."""
    from peft import inject_adapter_in_model

    config.base_model_name_or_path = None  # the base is recorded in run.json, not in the adapter
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    if adapter_name not in getattr(model, "peft_config", {}):  # pragma: no cover - peft sets it
        raise RuntimeError(f"peft did not record adapter '{adapter_name}' on {type(model).__name__}")


def add_lora(unet, text_encoder, cfg) -> None:
    """Attach LoRA to the U-Net (and to the text encoder when it is trained); freeze everything else."""
    import torch

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    # peft draws A from the global RNG: seed it (in a fork, leaving the caller's RNG alone) so the
    # same --seed gives the same adapter init, which exact resume and reproducible runs rely on
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        attach_adapter(unet, lora_config(cfg.rank, cfg.lora_alpha, cfg.lora_unet_targets))
        if cfg.train_text_encoder:
            attach_adapter(text_encoder, lora_config(cfg.text_encoder_rank, cfg.text_encoder_alpha,
                                                     cfg.lora_text_encoder_targets))


def has_lora(model) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_state_dicts(unet, text_encoder) -> tuple[dict, dict | None]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, save_embedding_layers=False))
    te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder, save_embedding_layers=False)) if has_lora(text_encoder) else None
    return unet_sd, te_sd


def save_lora(run_dir: Path, unet, text_encoder) -> Path:
    """Write run_dir/pytorch_lora_weights.safetensors atomically (diffusers' writer into a scratch
    folder, then one rename)."""
    from diffusers import StableDiffusionPipeline

    run_dir = Path(run_dir)
    unet_sd, te_sd = lora_state_dicts(unet, text_encoder)
    meta = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if te_sd is not None:
        meta["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    with scratch_dir(run_dir / LORA_WEIGHTS) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, safe_serialization=True, **meta
        )
        move_into(tmp, run_dir)
    return run_dir / LORA_WEIGHTS


# --------------------------------------------------------------------------------------------
# Reading a saved adapter and checking it fits a base (the kohya format: personalize/export/kohya.py)
# --------------------------------------------------------------------------------------------
# diffusers has written LoRA keys three ways over its releases; all name (component, module, down|up)
_LORA_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.(?:lora\.(down|up)|lora_linear_layer\.(down|up)|lora_(A|B))\.weight$")


@dataclass
class LoraLayer:
    down: "torch.Tensor"  # (rank, in_features[, 1, 1])
    up: "torch.Tensor"  # (out_features, rank[, 1, 1])
    alpha: float  # the output is scaled by alpha / rank

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def _pattern_value(module: str, pattern: dict, default: float) -> float:
    """peft's rank_pattern / alpha_pattern: a key matches a module name it ends with (as a regex)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


def read_lora(path: Path) -> dict[tuple[str, str], LoraLayer]:
    """{(component, module name): LoraLayer} of a diffusers-format LoRA file (ours, or any
    `save_lora_weights` output). Alphas come from the adapter metadata diffusers writes; a file
    without it gets alpha = rank, which is what diffusers assumes when loading it."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path}: no LoRA weights here (expected {LORA_WEIGHTS})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    parts: dict[tuple[str, str], dict] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if not m:
            raise UserError(f"{path}: unexpected key '{key}'; not a diffusers-format LoRA of a U-Net/text encoder")
        comp, module = m.group(1), m.group(2)
        which = m.group(3) or m.group(4) or {"A": "down", "B": "up"}[m.group(5)]
        parts.setdefault((comp, module), {})[which] = t
    layers = {}
    for (comp, module), p in sorted(parts.items()):
        if set(p) != {"down", "up"}:
            raise UserError(f"{path}: layer {comp}.{module} lacks its {'up' if 'down' in p else 'down'} weight")
        rank = int(p["down"].shape[0])
        if p["down"].ndim < 2 or p["up"].ndim != p["down"].ndim or int(p["up"].shape[1]) != rank:
            raise UserError(f"{path}: layer {comp}.{module} is inconsistent (down {tuple(p['down'].shape)}, "
                            f"up {tuple(p['up'].shape)}: the ranks differ); the file is damaged")
        alpha = config.get(f"{comp}.lora_alpha", rank)
        alpha = _pattern_value(module, config.get(f"{comp}.alpha_pattern"), alpha)
        layers[(comp, module)] = LoraLayer(p["down"], p["up"], alpha)
    if not layers:
        raise UserError(f"{path}: holds no LoRA layers")
    return layers


def _find_module(model, name: str):
    """A module by dotted name; text-encoder names are tried with and without `text_model.`
    (transformers 5 dropped that level of CLIPTextModel, older releases and kohya files have it)."""
    modules = dict(model.named_modules())
    for cand in (name, name.removeprefix("text_model."), "text_model." + name):
        if cand in modules:
            return modules[cand]
    return None


def lora_misfits(layers: dict[tuple[str, str], LoraLayer], components: dict) -> list[str]:
    """Why each LoRA layer would not fit the given `unet` / `text_encoder` (empty: it all fits)."""
    problems = []
    for (comp, module), layer in layers.items():
        target = _find_module(components[comp], module) if components.get(comp) is not None else None
        if target is None:
            problems.append(f"{comp}.{module} does not exist there")
            continue
        w = getattr(target, "base_layer", target).weight  # a module already wrapped by peft
        want_in, want_out = int(layer.down.shape[1]), int(layer.up.shape[0])
        if (int(w.shape[1]), int(w.shape[0])) != (want_in, want_out):
            problems.append(f"{comp}.{module} is {w.shape[1]}->{w.shape[0]}, the adapter expects {want_in}->{want_out}")
    return problems
