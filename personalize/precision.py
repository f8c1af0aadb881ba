"""The precision policy: what `--mixed-precision auto` means on this hardware, measured rather
than assumed (benchmarks/cpu_bf16.py, benchmarks/RESULTS.md). No accelerate here; `fit` applies it.
And inference's `--device` / `--dtype` (`pick_device`, `pick_dtype`; sources re-exports them)."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """`auto` = fp16 on CUDA (the BK-SDM recipe); on CPU, bf16 where oneDNN runs it natively
    (AVX512-BF16/AMX: a bk-sdm-small LoRA step 2.1x faster, 38% less peak memory than fp32, RESULTS.md)
    and fp32 elsewhere (emulated bf16 is far slower). Explicit values pass through; fp16 on CPU is
    not supported."""
    if requested == "auto":
        if not cpu:
            return "fp16"
        return "bf16" if cpu_bf16_is_native() else "no"
    if requested == "fp16" and cpu:
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    return requested


def cpu_bf16_is_native() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16 or AMX). Without them bf16 is
    emulated: on an AVX2-only CPU a bf16 conv ran 95x slower than fp32 (benchmarks/RESULTS.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_cpu_note(mixed_precision: str, device) -> str | None:
    """A one-line note when bf16 was asked for on a CPU that would run it emulated."""
    if mixed_precision == "bf16" and torch.device(device).type == "cpu" and not cpu_bf16_is_native():
        return ("note: this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 runs emulated and much slower "
                "than fp32 here; drop --mixed-precision bf16 for speed")
    return None


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are stored in under an accelerate mixed-precision setting."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def pick_device(device: str | None) -> torch.device:
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name (cpu, cuda, cuda:N, mps)") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UserError(f"--device {device}: this machine has {have} CUDA device(s) visible to this torch build")
    if d.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: not supported here (cpu, cuda, cuda:N, mps)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available in this torch build")
    return d


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA (what SD inference runs in), fp32 on CPU; bf16 is an option on both."""
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise UserError(f"unknown --dtype '{dtype}' (auto, fp32, fp16 or bf16)")
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; use bf16 or fp32 on CPU")
    return table[dtype]
