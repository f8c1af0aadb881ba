"""The precision policy: what `--mixed-precision auto` means on this hardware, measured rather
than assumed (benchmarks/cpu_bf16.py, benchmarks/RESULTS.md). No accelerate here; `fit` applies it."""

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
