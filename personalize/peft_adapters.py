"""Loading saved adapters of every method into a base's U-Net and text encoder, and fusing them.

LoRA and DoRA go through diffusers (`load_lora_weights`, `set_adapters`, `fuse_lora`: what a user
of the file does); LoHa, LoKr and OFT, saved as peft adapter folders, through peft itself
(`inject_adapter_in_model` + `set_peft_model_state_dict`, the calls `PeftModel.from_pretrained`
makes). Several LoHa or LoKr adapters are active together with one scale each (their deltas add);
OFT's rotations multiply, so an OFT is loaded alone and at scale 1. Every adapter is checked
against its run.json's method and against the base's shapes first: a misfit is one line."""

from __future__ import annotations

import json
from pathlib import Path

from .adapters import (ADAPTER_DIR, COMPONENTS, LORA_WEIGHTS, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, attach_adapter,
                       lora_misfits, method_of, read_lora)
from .errors import UserError


def check_mix(methods: list[str], weights: list[float], scale: float) -> None:
    """Refuse, before any weight is read, a set of adapters that cannot be active together."""
    if not methods:
        return
    families = {"diffusers" if method_of(m).storage == "diffusers" else m for m in methods}
    if len(families) > 1:
        raise UserError(f"--adapter: runs of {' and '.join(sorted(set(methods)))} cannot be mixed in one pipeline "
                        f"(peft wraps a layer with one kind of adapter); mix runs of one method (LoRA with DoRA is fine)")
    method = method_of(methods[0])
    if not method.mixable and (len(methods) > 1 or any(w * scale != 1 for w in weights)):
        raise UserError(f"--adapter: {method.name} adapters are orthogonal rotations, which compose by multiplication: "
                        f"they take one adapter at weight and scale 1 (got {len(methods)} at "
                        f"{', '.join(f'{w * scale:g}' for w in weights)})")


def read_peft(folder: Path, method: str):
    """(peft config, state dict without the PeftModel prefix) of one component's adapter folder."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / PEFT_CONFIG).is_file() or not (folder / PEFT_WEIGHTS).is_file():
        raise UserError(f"{folder}: no peft adapter here (expected {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{folder / PEFT_CONFIG}: not a peft adapter config ({type(e).__name__})") from None
    want = method_of(method).peft_type
    if str(config.peft_type.value) != want:
        raise UserError(f"{folder}: a {str(config.peft_type.value).lower()} adapter, but its run.json says "
                        f"{method}; the run is damaged or was mixed up with another")
    try:
        sd = load_file(str(folder / PEFT_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"{folder / PEFT_WEIGHTS}: not a readable safetensors file ({type(e).__name__})") from None
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()}


def peft_misfits(model, sd: dict, adapter_name: str) -> list[str]:
    """Why the saved tensors do not fit the adapter peft just built on `model` (empty: they fit)."""
    from peft.utils import get_peft_model_state_dict

    want = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    problems = [f"{k} does not exist there" for k in sorted(set(sd) - set(want))]
    problems += [f"{k} is missing from the adapter" for k in sorted(set(want) - set(sd))]
    problems += [f"{k} is {tuple(want[k].shape)} there, the adapter has {tuple(v.shape)}"
                 for k, v in sorted(sd.items()) if k in want and want[k].shape != v.shape]
    return problems


def adapter_components(run_dir: Path, method: str) -> list[str]:
    """The components a run's adapter has (its files checked to be there)."""
    run_dir = Path(run_dir)
    if method_of(method).storage == "diffusers":
        if not (run_dir / LORA_WEIGHTS).is_file():
            raise UserError(f"{run_dir}: a {method} run without {LORA_WEIGHTS}")
        return sorted({c for c, _ in read_lora(run_dir / LORA_WEIGHTS)})
    found = [c for c in COMPONENTS if (run_dir / ADAPTER_DIR / c).is_dir()]
    if not found:
        raise UserError(f"{run_dir}: a {method} run without its {ADAPTER_DIR}/ folder (unet/, text_encoder/)")
    return found


def check_lora_file(run_dir: Path, method: str, comps: dict, trained_on: str, base: str) -> None:
    layers = read_lora(Path(run_dir) / LORA_WEIGHTS)
    dora = any(x.magnitude is not None for x in layers.values())
    if dora != (method == "dora"):
        raise UserError(f"{run_dir}: run.json says {method} but its {LORA_WEIGHTS} holds a "
                        f"{'DoRA' if dora else 'plain LoRA'} adapter; the run is damaged or was mixed up")
    problems = lora_misfits(layers, comps)
    if problems:
        raise misfit(run_dir, trained_on, base, problems)


def misfit(run_dir, trained_on: str, base: str, problems: list[str]) -> UserError:
    return UserError(f"adapter {run_dir} was trained on {trained_on} and does not fit {base}: {len(problems)} "
                     f"layer(s) differ, e.g. {problems[0]}; generate on {trained_on} (or a base of the same architecture)")


def load_peft_adapter(comps: dict, run_dir: Path, method: str, adapter_name: str, trained_on: str, base: str) -> None:
    """One LoHa/LoKr/OFT run's adapter folders into comps' U-Net and text encoder."""
    from peft.utils import set_peft_model_state_dict

    for comp in adapter_components(run_dir, method):
        config, sd = read_peft(Path(run_dir) / ADAPTER_DIR / comp, method)
        model = comps[comp]
        try:
            attach_adapter(model, config, adapter_name)
        except UserError as e:
            raise misfit(run_dir, trained_on, base, [str(e)]) from None
        problems = peft_misfits(model, sd, adapter_name)
        if problems:
            raise misfit(run_dir, trained_on, base, [f"{comp}.{p}" for p in problems])
        set_peft_model_state_dict(model, sd, adapter_name=adapter_name)
        model.requires_grad_(False)


def activate(comps: dict, weights: dict[str, float]) -> None:
    """Make every named peft adapter active at its weight (LoHa/LoKr: scaling = w * alpha / r)."""
    from peft.tuners.lycoris_utils import LycorisLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    for comp in COMPONENTS:
        model = comps.get(comp)
        for module in (model.modules() if model is not None else ()):
            if isinstance(module, BaseTunerLayer):
                names = [n for n in weights if n in module._get_available_adapters()]
                module.set_adapter(names)
                if isinstance(module, LycorisLayer):
                    for n in names:
                        module.set_scale(n, weights[n])
        if model is not None:
            model.requires_grad_(False)


def merge_and_unload(model) -> None:
    """Fuse every active peft adapter into the base weights and put the plain layers back (peft's
    `merge_and_unload`, for a model with injected adapters rather than a PeftModel)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = False
