"""Frozen convolutions packed once for oneDNN: `--pack-frozen-convs`.

torch hands oneDNN a plain (OIHW) conv weight on every call, and oneDNN reorders it into the blocked
layout its kernel wants, in the forward and again (another layout) in the backward's input gradient.
For the deepest convs of an SD U-Net at 256 px (1280/2560 channels at 8x8 and 16x16) that reorder is
most of the call: over a bk-sdm-small LoRA step on an AMX Xeon the frozen-weight reorders took 259 ms,
the conv kernels 89 ms (oneDNN's verbose log; benchmarks/RESULTS.md). Here each large frozen conv is
packed once, for the forward (`mkldnn_convolution` on a weight in the kernel's layout) and for the input
gradient as a transposed conv (`_convolution_transpose_pointwise`), and its plain weight is dropped
while the block runs: outputs and input gradients are bit-identical to `F.conv2d`'s, the two packed
copies take the place of one plain one (memory + one weight's size; a bk-sdm-small LoRA step at 256 px:
0.93 -> 0.75 s, +0.3-0.5 GB peak), and on exit the plain weight is rebuilt from the packed one, exactly. bf16 weights only (the frozen base under bf16 mixed precision):
there the input gradient is bit-identical too (oneDNN computes its backward-data as the transposed
conv's forward); an fp32 conv's backward runs another kernel, whose sums differ in the last bits.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .host_memory import trim

MIN_BYTES = 16 * 2**20  # the 1280/2560-channel 3x3 convs: 219 of the 259 ms of reorders (RESULTS.md)


def available() -> bool:
    """Whether this torch has the oneDNN ops (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise")


class _PackedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, m):
        ctx.m = m
        return torch.mkldnn_convolution(x, m._packed_fwd, bias, m.padding, m.stride, m.dilation, 1)

    @staticmethod
    def backward(ctx, grad_out):
        m = ctx.m
        grad_in = torch.ops.mkldnn._convolution_transpose_pointwise(
            grad_out.contiguous(), m._packed_bwd, None, list(m.padding), [0, 0], list(m.stride), list(m.dilation), 1,
            "none", [], "")
        return grad_in, None, None


def _packable(m: nn.Module, min_bytes: int) -> bool:
    w = m.weight if type(m) is nn.Conv2d else None
    return (w is not None and not w.requires_grad and w.device.type == "cpu" and w.dtype == torch.bfloat16
            and m.groups == 1 and tuple(m.stride) == (1, 1) and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
            and (m.bias is None or not m.bias.requires_grad) and w.numel() * w.element_size() >= min_bytes)


def _forward(self, x):
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(dev))  # what autocast does for a conv
    if self._packed_fwd is None:  # packed on the first call, for the shapes the run has
        w = self.weight.detach()
        shape = list(x.shape)
        self._packed_fwd = torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), 1, shape)
        out_shape = [shape[0], w.shape[0], *((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
            shape[2:], self.padding, self.dilation, w.shape[2:], self.stride))]
        self._packed_bwd = torch.ops.mkldnn._reorder_convolution_transpose_weight(
            w, list(self.padding), [0, 0], list(self.stride), list(self.dilation), 1, out_shape)
        del self.weight, w  # the packed pair takes its place while the block runs
        self.register_parameter("weight", None)
        trim()  # glibc would keep the freed weight in its heap for the whole run (+0.3 GB measured)
    return _PackedConv.apply(x.to(torch.bfloat16).contiguous(), self.bias, self)  # bf16 weights and bias only


@contextlib.contextmanager
def packed_frozen_convs(model: nn.Module, enabled: bool, min_bytes: int | None = None):
    """Inside the block, every frozen stride-1 Conv2d of `model` with a weight of `min_bytes` or more
    computes from weights packed once (on its first call); afterwards each has its plain weight back,
    bit for bit. Off when not `enabled` or where this torch lacks the oneDNN ops."""
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    convs = [m for m in model.modules() if _packable(m, min_bytes)] if enabled and available() else []
    for m in convs:
        m._packed_fwd = m._packed_bwd = None
        m.forward = _forward.__get__(m)
    try:
        yield len(convs)
    finally:
        for m in convs:
            if m._packed_fwd is not None:
                m.weight = nn.Parameter(m._packed_fwd.to_dense(), requires_grad=False)
            for name in ("forward", "_packed_fwd", "_packed_bwd"):
                m.__dict__.pop(name, None)
        if convs:
            trim()
