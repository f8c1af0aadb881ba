"""Resumable training checkpoints: `checkpoints/step-N/` with the trainable weights and the
optimizer state as safetensors, the rest as JSON (no pickles), written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .fileio import atomic_dir

CHECKPOINTS_DIR = "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    d = Path(run_dir) / CHECKPOINTS_DIR
    out = []
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith("step-") and (p / "state.json").is_file():
                out.append((int(p.name[5:]), p))
    return sorted(out)


def _flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, params: dict[str, nn.Parameter], optimizer, extra: dict,
                    keep: int) -> Path:
    """Write checkpoints/step-N atomically, then drop the oldest beyond `keep`."""
    from safetensors.torch import save_file

    final = Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"
    with atomic_dir(final, replace=True) as tmp:
        save_file({k: p.detach().contiguous().cpu() for k, p in params.items()}, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **extra}, indent=1))
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class DamagedCheckpoint(UserError):
    """A checkpoint whose files do not read back (truncated, zeroed, hand-edited)."""


def _read(ckpt: Path, params: dict[str, nn.Parameter]) -> tuple[dict, dict, dict]:
    """Everything a checkpoint holds, validated before any of it is applied."""
    from safetensors.torch import load_file

    try:
        weights = load_file(ckpt / "trainable.safetensors")
        opt = load_file(ckpt / "optimizer.safetensors")
        state = json.loads((ckpt / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "optimizer" not in state:
            raise ValueError("state.json lacks step/optimizer")
    except Exception as e:  # noqa: BLE001 - safetensors, OS and JSON errors all mean "damaged" here
        raise DamagedCheckpoint(f"{ckpt}: damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    missing = set(params) ^ set(weights)
    if missing:
        raise UserError(f"checkpoint {ckpt} does not match this run's trainable weights "
                        f"({len(missing)} names differ, e.g. {sorted(missing)[0]}); was it made with other flags?")
    for k, p in params.items():
        if tuple(weights[k].shape) != tuple(p.shape):
            raise DamagedCheckpoint(f"{ckpt}: {k} has shape {tuple(weights[k].shape)}, the run's is {tuple(p.shape)}")
    return weights, opt, state


def load_checkpoint(ckpt: Path, params: dict[str, nn.Parameter], optimizer) -> dict:
    weights, opt, state = _read(ckpt, params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k].to(p.device, p.dtype))
    try:
        optimizer.load_state_dict(_unflatten_optimizer_state(opt, state["optimizer"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{ckpt}: optimizer state does not fit ({type(e).__name__})") from None
    return state


def resume_latest(run_dir: Path, params: dict[str, nn.Parameter], optimizer, log=print) -> tuple[dict, Path] | None:
    """Load the newest intact checkpoint (saying which damaged ones were passed over), or None
    when there is none at all; all damaged: one line, never a silently broken state."""
    ckpts = list_checkpoints(run_dir)
    damaged = []
    for _, ckpt in reversed(ckpts):
        try:
            state = load_checkpoint(ckpt, params, optimizer)
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            log(f"warning: {e}; trying the one before")
            continue
        return state, ckpt
    if damaged:
        raise UserError(f"no intact checkpoint in {Path(run_dir) / CHECKPOINTS_DIR} ({damaged[0]}); "
                        f"start over with --overwrite")
    return None
