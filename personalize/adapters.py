"""Parameter-efficient adapters, one registry of methods, all attached with peft:

- LoRA (Hu et al. 2022): W + (alpha/r) B A.
- DoRA (Liu et al. 2024, weight-decomposed LoRA): W' = m (W + (alpha/r) B A) / ||W + (alpha/r) B A||,
  a learned magnitude m per output row (peft's `use_dora`).
- LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): W + (alpha/r) (B1 A1) * (B2 A2), a Hadamard product.
- LoKr (Yeh et al. 2024, LyCORIS): W + (alpha/r) kron(W1, B2 A2), a Kronecker product.
- OFT (Qiu et al. 2023, orthogonal finetuning): the layer's input rotated by a block-diagonal
  orthogonal R (Cayley transform of a skew-symmetric matrix), W R.
- BOFT (Liu et al. 2024): OFT's R as a product of butterfly-permuted block-diagonal factors, and a
  learned scale per output.
- HRA (Yuan et al. 2024): R a product of r Householder reflections (I - 2 u u^T / |u|^2).

rsLoRA (Kalajdzievski 2023: scale alpha/sqrt(r)) and per-module ranks/alphas (peft's rank_pattern /
alpha_pattern) are options of the LoRA-family configs.

LoRA and DoRA are saved in the diffusers format that plain `pipe.load_lora_weights(run_dir)`
reads (rank/alpha, patterns, `use_dora`/`use_rslora` in the safetensors metadata, DoRA's magnitudes as
`lora_magnitude_vector`); LoHa, LoKr, OFT, BOFT and HRA as a peft adapter folder per component
(`adapter/unet/`, `adapter/text_encoder/`: `adapter_config.json` + `adapter_model.safetensors`) that
`PeftModel.from_pretrained` loads. `save_adapter` is the one writer of a run's adapter."""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .defaults import RANKED_METHODS
from .errors import UserError
from .fileio import move_into, scratch_dir

if TYPE_CHECKING:
    import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers looks for by default
ADAPTER_DIR = "adapter"  # peft-format methods: adapter/<component>/ (PeftModel.save_pretrained's layout)
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every key
COMPONENTS = ("unet", "text_encoder")


def _part(cfg, part: str) -> tuple[int, float, list[str]]:
    if part == "unet":
        return cfg.rank, cfg.lora_alpha, list(cfg.lora_unet_targets)
    return cfg.text_encoder_rank, cfg.text_encoder_alpha, list(cfg.lora_text_encoder_targets)


def _patterns(cfg) -> dict:
    """peft's per-module rank_pattern / alpha_pattern (the same for the U-Net and the text encoder:
    a pattern names modules of one of them)."""
    return {"rank_pattern": dict(getattr(cfg, "rank_pattern", None) or {}),
            "alpha_pattern": dict(getattr(cfg, "alpha_pattern", None) or {})}


def lora_config(rank: int, alpha: float, targets: list[str], use_dora: bool = False, use_rslora: bool = False,
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None):
    from peft import LoraConfig

    # gaussian init of A (B = 0): the adapter starts as the identity, as in the diffusers scripts
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets),
                      lora_dropout=0.0, use_dora=use_dora, use_rslora=use_rslora, rank_pattern=dict(rank_pattern or {}),
                      alpha_pattern=dict(alpha_pattern or {}))


def _lora(cfg, part):
    return lora_config(*_part(cfg, part), use_rslora=bool(getattr(cfg, "rslora", False)), **_patterns(cfg))


def _dora(cfg, part):
    # DoRA at LoRA's rank/alpha: the paper swaps it in for LoRA at the same settings
    return lora_config(*_part(cfg, part), use_dora=True, use_rslora=bool(getattr(cfg, "rslora", False)), **_patterns(cfg))


def _loha(cfg, part):
    from peft import LoHaConfig

    r, alpha, targets = _part(cfg, part)
    # init_weights=True: B2 = 0, so the adapter starts as the identity (peft's and LyCORIS' default)
    return LoHaConfig(r=r, alpha=alpha, target_modules=targets, init_weights=True, **_patterns(cfg))


def _lokr(cfg, part):
    from peft import LoKrConfig

    r, alpha, targets = _part(cfg, part)
    return LoKrConfig(r=r, alpha=alpha, target_modules=targets, decompose_factor=cfg.lokr_factor, init_weights=True,
                      **_patterns(cfg))


def _oft(cfg, part):
    from peft import OFTConfig

    _, _, targets = _part(cfg, part)
    # r = 0 with a block size: peft derives the block count per layer (its recommended way)
    return OFTConfig(r=0, oft_block_size=cfg.oft_block_size, target_modules=targets, init_weights=True)


def _boft(cfg, part):
    from peft import BOFTConfig

    _, _, targets = _part(cfg, part)
    # a block count (block size 0): peft derives each layer's block size from it, as its DreamBooth example
    return BOFTConfig(boft_block_num=cfg.boft_block_num, boft_block_size=0,
                      boft_n_butterfly_factor=cfg.boft_butterfly_factor, target_modules=targets, init_weights=True)


def _hra(cfg, part):
    from peft import HRAConfig

    _, _, targets = _part(cfg, part)
    # init_weights=True: pairs of equal reflections, so the adapter starts as the identity (an even rank)
    return HRAConfig(r=cfg.hra_rank, target_modules=targets, init_weights=True)


@dataclass(frozen=True)
class Method:
    name: str
    algorithm: str  # the paper
    peft_type: str  # PeftConfig.peft_type of its adapters
    storage: str  # "diffusers" (pytorch_lora_weights.safetensors) or "peft" (adapter/<component>/)
    mixable: bool  # several adapters of it add up (generate --adapter A --adapter B, weights, scale)
    build: Callable  # (cfg, "unet" | "text_encoder") -> a peft config

    @property
    def weights_file(self) -> str:
        return LORA_WEIGHTS if self.storage == "diffusers" else ADAPTER_DIR


ADAPTER_METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "LoRA (Hu et al. 2022)", "LORA", "diffusers", True, _lora),
    Method("dora", "DoRA (Liu et al. 2024)", "LORA", "diffusers", True, _dora),
    Method("loha", "LoHa (Hyeon-Woo et al. 2022; LyCORIS)", "LOHA", "peft", True, _loha),
    Method("lokr", "LoKr (LyCORIS, Yeh et al. 2024)", "LOKR", "peft", True, _lokr),
    # rotations compose by multiplication: a weighted sum of two OFTs is not an OFT
    Method("oft", "OFT (Qiu et al. 2023)", "OFT", "peft", False, _oft),
    # BOFT's butterfly rotations and HRA's Householder reflections compose by multiplication too
    Method("boft", "BOFT (Liu et al. 2024)", "BOFT", "peft", False, _boft),
    Method("hra", "HRA (Yuan et al. 2024)", "HRA", "peft", False, _hra),
)}


def method_of(name: str) -> Method:
    if name not in ADAPTER_METHODS:
        raise UserError(f"'{name}' is not an adapter method ({', '.join(ADAPTER_METHODS)})")
    return ADAPTER_METHODS[name]


def attach_adapter(model, config, adapter_name: str = "default") -> None:
    """Inject a peft adapter into `model` with peft's own `inject_adapter_in_model`, the call
    diffusers' loaders make. Never through transformers' `PreTrainedModel.add_adapter`: its peft
    version gate is a transformers release's to move (5.24 demanded an unreleased peft and broke
    every text-encoder LoRA), and the adapter we save is peft's state dict either way. A config
    that does not fit the model (no such target module, an OFT block size that does not divide a
    width) is a one-line UserError."""
    from peft import inject_adapter_in_model

    config.base_model_name_or_path = None  # the base is recorded in run.json, not in the adapter
    try:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{str(config.peft_type.value).lower()} on {type(model).__name__}: {what}") from None
    if adapter_name not in getattr(model, "peft_config", {}):  # pragma: no cover - peft sets it
        raise RuntimeError(f"peft did not record adapter '{adapter_name}' on {type(model).__name__}")


def add_adapter(unet, text_encoder, cfg) -> None:
    """Attach cfg.method's adapter to the U-Net (and to the text encoder when it is trained);
    freeze everything else."""
    import torch

    method = method_of(getattr(cfg, "method", "lora"))
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    # peft draws the init from the global RNG: seed it (in a fork, leaving the caller's RNG alone)
    # so the same --seed gives the same adapter init, which exact resume and reproducible runs rely on
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        attach_adapter(unet, method.build(cfg, "unet"))
        if cfg.train_text_encoder:
            attach_adapter(text_encoder, method.build(cfg, "text_encoder"))


add_lora = add_adapter  # the name it had when LoRA was the only method


@contextlib.contextmanager
def lora_inputs_uncast(models, autocast: bool):
    """Inside an autocast region, stop peft's plain LoRA layers casting each input to their fp32
    weights' dtype: autocast casts it straight back for the matmul, so the round trip (bf16 ->
    fp32 -> bf16) is exact and buys nothing but two activation-sized copies per layer, forward and
    backward (a third of a LoRA layer's step time on CPU: benchmarks/RESULTS.md). Outputs and
    gradients are bit-identical. DoRA and the LyCORIS methods keep theirs (their own forward)."""
    layers = [m for model in models for m in model.modules()
              if hasattr(m, "lora_A") and hasattr(m, "_cast_input_dtype") and not getattr(m, "lora_variant", None)
              ] if autocast else []
    before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.cast_input_dtype_enabled = b


def check_attach(base_path: Path, cfg) -> None:
    """Attach cfg.method's adapter to empty (meta-device) copies of the base's U-Net and text
    encoder, so that a target or block size the base cannot take fails in one line before any
    weight is read or anything written."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    method = method_of(getattr(cfg, "method", "lora"))
    base_path = Path(base_path)
    with torch.device("meta"):  # shapes only: no memory, no init time
        models = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base_path / "unet"))}
        if cfg.train_text_encoder:
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(base_path / "text_encoder"))
    # BOFT fills its permutation matrices entry by entry, which the meta device cannot: its adapter
    # tensors are made on the CPU (the base's weights stay shapes only)
    with contextlib.nullcontext() if method.name == "boft" else torch.device("meta"):
        for comp, model in models.items():
            attach_adapter(model, method.build(cfg, comp))
    names = [n for model in models.values() for n, mod in model.named_modules() if hasattr(mod, "get_base_layer")]
    for flag in ("rank_pattern", "alpha_pattern"):  # peft only warns about a pattern that matches nothing
        for key in (getattr(cfg, flag, None) or {}) if method.name in RANKED_METHODS else ():
            if not any(re.match(rf"(.*\.)?({key})$", n) for n in names):
                raise UserError(f"--{flag.replace('_', '-')} {key}: matches none of the targeted modules (such as "
                                f"{names[0] if names else 'none'}); a pattern is a regex matched against a name's end")
    if method.name == "boft":
        # without its CUDA extension peft quietly trains one butterfly factor whatever was asked (a warning)
        for comp, model in models.items():
            for name, module in model.named_modules():
                got = getattr(module, "boft_R", {}).get("default")
                if got is not None and int(got.shape[0]) != cfg.boft_butterfly_factor:
                    raise UserError(f"--boft-butterfly-factor {cfg.boft_butterfly_factor}: peft builds more than one "
                                    f"butterfly factor only with its CUDA extension (fbd_cuda: CUDA and ninja), which "
                                    f"is not available here; use --boft-butterfly-factor 1")
    if method.name == "oft":
        # peft quietly swaps a block size that does not divide a layer's width for one that does
        # (a warning): the run would not be the one asked for
        for comp, model in models.items():
            for name, module in model.named_modules():
                got = getattr(module, "oft_block_size", {}).get("default")
                kernel = tuple(getattr(module.get_base_layer(), "kernel_size", (1, 1))) if got is not None else (1, 1)
                if kernel != (1, 1):  # peft 0.21 rotates unfolded patches and folds them back (summed)
                    raise UserError(f"oft on {comp}.{name}: peft's OFT on a {kernel[0]}x{kernel[1]} conv does not "
                                    f"match its own merged weights, so generate and every export would differ; target "
                                    f"Linear or 1x1 layers, or use boft/hra (their convs are exact)")
                if got is not None and got != cfg.oft_block_size:
                    width = getattr(module, "in_features", None) or "its"
                    raise UserError(f"--oft-block-size {cfg.oft_block_size} does not divide the input width {width} "
                                    f"of {comp}.{name} (peft would use {got}); pick a divisor of every target's width")


def has_lora(model) -> bool:
    return bool(getattr(model, "peft_config", None))


has_adapter = has_lora


def lora_state_dicts(unet, text_encoder) -> tuple[dict, dict | None]:
    """peft's own key layout (`<module>.lora_A/lora_B.weight`, DoRA's `lora_magnitude_vector`) for
    every targeted module. Not diffusers' `convert_state_dict_to_diffusers`: it renames only the
    attention projections it knows (to `lora.down/up`) and leaves conv and feed-forward layers as
    `lora_A/B`, and diffusers' loader, seeing two formats in one file, skips the attention layers
    with only a warning. peft keys are what that loader reads natively."""
    from peft.utils import get_peft_model_state_dict

    unet_sd = get_peft_model_state_dict(unet, save_embedding_layers=False)
    te_sd = get_peft_model_state_dict(text_encoder, save_embedding_layers=False) if has_lora(text_encoder) else None
    if te_sd is not None:
        # DoRA: peft's state dict names a magnitude `lora_magnitude_vector`, which peft's loader (the
        # U-Net's, through diffusers) maps back; transformers' loader (the text encoder's) does not,
        # and wants the parameter's own name, `lora_magnitude_vector.weight`
        te_sd = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in te_sd.items()}
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


def save_peft(run_dir: Path, unet, text_encoder) -> Path:
    """run_dir/adapter/<component>/ in PeftModel.save_pretrained's layout, written atomically."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    with scratch_dir(run_dir / ADAPTER_DIR) as tmp:
        folder = tmp / ADAPTER_DIR
        for name, model in (("unet", unet), ("text_encoder", text_encoder)):
            if not has_adapter(model):
                continue
            (folder / name).mkdir(parents=True)
            sd = get_peft_model_state_dict(model, save_embedding_layers=False)
            save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in sd.items()},
                      str(folder / name / PEFT_WEIGHTS), metadata={"format": "pt"})
            model.peft_config["default"].save_pretrained(str(folder / name))
        move_into(tmp, run_dir)
    return run_dir / ADAPTER_DIR


def save_adapter(run_dir: Path, method: str, unet, text_encoder) -> list[str]:
    """THE writer of a run's adapter into `run_dir` (the final save and any step save): the
    method's own format. Returns the names it wrote."""
    if method_of(method).storage == "diffusers":
        save_lora(run_dir, unet, text_encoder)
        return [LORA_WEIGHTS]
    save_peft(run_dir, unet, text_encoder)
    return [ADAPTER_DIR]


# --------------------------------------------------------------------------------------------
# Reading a saved adapter and checking it fits a base (the kohya format: personalize/export/kohya.py)
# --------------------------------------------------------------------------------------------
# diffusers has written LoRA keys three ways over its releases; all name (component, module, down|up)
_LORA_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.(?:lora\.(down|up)|lora_linear_layer\.(down|up)|lora_(A|B))\.weight$")
_MAGNITUDE_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.lora_magnitude_vector(?:\.weight)?$")  # DoRA's m


@dataclass
class LoraLayer:
    down: "torch.Tensor"  # (rank, in_features[, 1, 1])
    up: "torch.Tensor"  # (out_features, rank[, 1, 1])
    alpha: float  # the output is scaled by alpha / rank (rsLoRA's alpha/sqrt(rank) folded in)
    magnitude: "torch.Tensor | None" = None  # DoRA: the learned norm of each output row (out_features,)

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
        mag = _MAGNITUDE_KEY.match(key)
        if mag:
            parts.setdefault((mag.group(1), mag.group(2)), {})["magnitude"] = t
            continue
        m = _LORA_KEY.match(key)
        if not m:
            raise UserError(f"{path}: unexpected key '{key}'; not a diffusers-format LoRA of a U-Net/text encoder")
        comp, module = m.group(1), m.group(2)
        which = m.group(3) or m.group(4) or {"A": "down", "B": "up"}[m.group(5)]
        parts.setdefault((comp, module), {})[which] = t
    layers = {}
    for (comp, module), p in sorted(parts.items()):
        if not {"down", "up"} <= set(p):
            raise UserError(f"{path}: layer {comp}.{module} lacks its {'up' if 'down' in p else 'down'} weight")
        rank = int(p["down"].shape[0])
        if p["down"].ndim < 2 or p["up"].ndim != p["down"].ndim or int(p["up"].shape[1]) != rank:
            raise UserError(f"{path}: layer {comp}.{module} is inconsistent (down {tuple(p['down'].shape)}, "
                            f"up {tuple(p['up'].shape)}: the ranks differ); the file is damaged")
        alpha = config.get(f"{comp}.lora_alpha", rank)
        alpha = _pattern_value(module, config.get(f"{comp}.alpha_pattern"), alpha)
        if config.get(f"{comp}.use_rslora"):
            alpha *= math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r): the same as alpha*sqrt(r) over r
        mag = p.get("magnitude")
        if mag is not None and mag.numel() != int(p["up"].shape[0]):
            raise UserError(f"{path}: layer {comp}.{module} has {mag.numel()} DoRA magnitudes for "
                            f"{int(p['up'].shape[0])} outputs; the file is damaged")
        layers[(comp, module)] = LoraLayer(p["down"], p["up"], alpha, mag)
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
