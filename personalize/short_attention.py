"""Short attentions in bf16 on the CPU through SDPA's math kernel, not its flash kernel.

torch's CPU flash attention pays a fixed cost per call in its bf16 backward (about 2 ms on a 2-core
AMX Xeon; fp32 does not), which dominates when the attention is small: the text encoder's 77-token
self-attention takes 3.8 ms forward + backward through flash and 1.6 ms through the math kernel (plain
matmuls and a softmax), a U-Net cross-attention of 256 queries x 77 keys 4.3 ms against 2.3, while at
1024 x 1024 flash is 4x faster (35 ms against 135). So inside the block each attention of the trained
models whose queries x keys stay under `MAX_PAIRS` computes in bf16/fp16 on the CPU through the math
kernel; the others, and every fp32 or GPU call, keep SDPA's own choice (benchmarks/RESULTS.md). The
choice does not depend on whether autograd records the call (forward only, flash would be the faster by
~0.5 ms a call): `--prior base-prediction` compares the adapted model's prediction with the base's, made
without grad, and a zero-initialised adapter must predict exactly what the base does.
The math kernel holds the (small) attention matrix for the backward; the outputs agree with flash's
to bf16 rounding, not bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .forwards import replaced_forwards

# 256 x 77 (a cross-attention at 16x16 latents) is faster through math, 256 x 256 and 1024 x 77 are not
MAX_PAIRS = 32768


def _tokens(x: torch.Tensor) -> int:
    return x.shape[1] if x.ndim == 3 else math.prod(x.shape[2:])  # (B, L, C) or a (B, C, H, W) map


def _is_short(hidden: torch.Tensor, context: torch.Tensor | None, max_pairs: int) -> bool:
    dev = hidden.device.type
    if dev != "cpu":
        return False
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    queries = _tokens(hidden)
    return queries * (_tokens(context) if context is not None else queries) <= max_pairs


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, whether its second argument is a cross-attention's context): diffusers' `Attention`
    takes `encoder_hidden_states` there, CLIP's self-attention an attention mask."""
    from diffusers.models.attention_processor import Attention
    from transformers.models.clip.modeling_clip import CLIPAttention

    return [(m, isinstance(m, Attention)) for m in model.modules() if isinstance(m, (Attention, CLIPAttention))]


def _wrap(m: nn.Module, cross: bool, max_pairs: int):
    forward = m.forward

    def short_forward(hidden_states, *args, **kwargs):
        context = (args[0] if args else kwargs.get("encoder_hidden_states")) if cross else None
        if _is_short(hidden_states, context, max_pairs):
            with sdpa_kernel(SDPBackend.MATH):
                return forward(hidden_states, *args, **kwargs)
        return forward(hidden_states, *args, **kwargs)

    return short_forward


def use_math_for_short_attention(models, max_pairs: int = MAX_PAIRS) -> list:
    """From now on, the attentions of `models` (diffusers' `Attention`, CLIP's) with at most
    `max_pairs` query-key pairs, in bf16 or fp16 on the CPU, run through SDPA's math kernel (for
    models that live only as long as the run, such as `--prior base-prediction`'s frozen copy).
    Returns the (module, cross) pairs changed."""
    modules = [m for model in models for m in _attention_modules(model)]
    for m, cross in modules:
        m.forward = _wrap(m, cross, max_pairs)
    return modules


def math_for_short_attention(models, enabled: bool = True, max_pairs: int = MAX_PAIRS):
    """`use_math_for_short_attention` inside the block; the modules' own forwards back after."""
    modules = [m for model in models for m in _attention_modules(model)] if enabled else []
    return replaced_forwards([(m, _wrap(m, cross, max_pairs)) for m, cross in modules])
