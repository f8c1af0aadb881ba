"""Attention on the CPU while a run trains: SDPA's own flash kernel forward, its backward in fp32.

torch's CPU flash attention (FlashAttention-2's tiling, Dao 2023) computes the backward of a bf16 or fp16
call through small reduced-precision GEMMs per tile, which on a 2-core AMX Xeon run no faster than fp32
ones and carry a fixed cost a call. The same backward op on the saved tensors upcast to fp32 is faster at
every attention shape of an SD U-Net and its CLIP text encoder at 256 px, and its gradients are closer to
exact (fp32 accumulation throughout). One diffusers `Attention` forward + backward, batch 2, bf16
(`benchmarks/attention_kernels.py`, benchmarks/RESULTS.md): 32x32 latents' self-attention (1024 x 1024
tokens) 30.8 -> 29.1 ms, cross-attention (1024 x 77) 7.3 -> 5.8, 16x16 self 6.6 -> 5.8, 16x16 cross
5.2 -> 3.5, 8x8 self 4.6 -> 3.8, CLIP's causal 77 x 77 3.2 -> 1.2; within 0.2 ms of SDPA's math kernel
where that was the faster (the short ones took it before, with its attention matrices held for the
backward). On the whole LoRA step, against SDPA's own backward: 0.703 -> 0.663 s/step on AMX, 2.751 -> 2.615
with oneDNN capped to AVX512-BF16 (`train_speed.py --options sdpa_backward`), peak RSS 15-20 MB lower
(`memory_timeline.py --sdpa-backward`).

So inside `fp32_attention_backward()`, an SDPA call on the CPU in bf16 or fp16 that SDPA itself would
send to its flash kernel and that autograd records goes through `FlashFp32Backward`: the same forward op
with the same arguments (outputs bit for bit SDPA's, with or without grad: a zero-initialised adapter
still predicts exactly what the frozen base does), and for the backward the saved query, key, value,
output and log-sum-exp upcast to fp32, the gradients cast back. Any other call (no grad, fp32, CUDA,
dropout, grouped-query, a mask that trains, a kernel the caller chose with `sdpa_kernel`) is SDPA's own.

The block swaps `torch.nn.functional.scaled_dot_product_attention`, which diffusers' and transformers'
attentions look up at each call, and puts SDPA back when the last block open ends (nested blocks, or
two runs in threads, count). A call from another thread meanwhile gets the same forward and an fp32
backward; nothing else changes for it.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

_lock = threading.Lock()
_depth = 0
_sdpa = F.scaled_dot_product_attention  # what the block found there, called for every other call
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class FlashFp32Backward(torch.autograd.Function):
    """SDPA's CPU flash forward as is; its backward op on fp32 upcasts of what the forward saved."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal: bool, scale):
        out, logsumexp = _flash(query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        ctx.save_for_backward(query, key, value, attn_mask, out, logsumexp)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, attn_mask, out, logsumexp = ctx.saved_tensors
        f32 = [t.float() for t in (grad_out, query, key, value, out)]
        grads = _flash_backward(*f32, logsumexp, 0.0, ctx.is_causal,
                                attn_mask=None if attn_mask is None else attn_mask.float(), scale=ctx.scale)
        return (*(g.to(t.dtype) for g, t in zip(grads, (query, key, value))), None, None, None)


def _boolean_mask_as_float(mask, dtype):
    """SDPA's own conversion: True keeps a pair (0), False masks it (-inf)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask.logical_not(), float("-inf"))


def _records_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """`F.scaled_dot_product_attention`, with the fp32 backward where it applies (module docstring)."""
    if (query.device.type != "cpu" or enable_gqa or not _records_grad(query, key, value, attn_mask)):
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if torch.is_autocast_enabled("cpu"):  # as SDPA's autocast rule: every floating input in the autocast dtype
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
    if (query.dtype not in (torch.bfloat16, torch.float16) or key.dtype != query.dtype or value.dtype != query.dtype
            or attn_mask is not None and attn_mask.requires_grad  # the flash backward gives a mask no gradient
            or torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
            != SDPBackend.FLASH_ATTENTION.value):
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    # the flash op is on no autocast list: it runs in the dtype given, as inside SDPA
    return FlashFp32Backward.apply(query, key, value, _boolean_mask_as_float(attn_mask, query.dtype), is_causal, scale)


@contextlib.contextmanager
def fp32_attention_backward(enabled: bool = True):
    """Inside the block, SDPA calls take the fp32 backward where it applies; SDPA's own after."""
    global _depth, _sdpa
    if not enabled:
        yield
        return
    with _lock:
        if _depth == 0:
            _sdpa = F.scaled_dot_product_attention
        _depth += 1
        F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                F.scaled_dot_product_attention = _sdpa
