"""Frozen convolutions lowered to one matrix product each (im2col + GEMM) where their weight dominates.

A convolution can be computed as a single matrix product: the input's k x k neighbourhoods laid out
as rows (im2col) times the weight as a (out, k*k*in) matrix (Chellapilla, Puri & Simard 2006, "High
performance convolutional neural networks for document processing"), and its input gradient as the
output gradient times the same matrix, summed back into place (col2im). torch's CPU convolution
hands oneDNN a plain weight on every call, which oneDNN reorders into its kernel's blocked layout,
forward and again (another layout) for the input gradient; where the weight is large and the image
small (the 1280/2560-channel convs of an SD U-Net at 8x8 and 16x16 latents) that reorder is most of
the call: 259 ms of a 0.9 s bk-sdm-small LoRA step at 256 px on an AMX Xeon, the kernels 89 ms
(oneDNN's verbose log; benchmarks/RESULTS.md). A matrix product reads the weight as it is, in both
directions, so no reorder and no second copy: each frozen conv with padding k // 2 and equal strides
(the 3x3 and 1x1 convs, the stride-2 downsamplers) whose weight has at least `MIN_RATIO` times as many
elements as its im2col matrix computes this way (its weight rewritten in place into (out, kh, kw, in)
order inside the block, so the matrix is a view of it).

Measured (`benchmarks/train_speed.py --options conv_kernels`, bk-sdm-small shape, 256 px): a bf16 LoRA
step on an AMX Xeon 0.911 -> 0.695 s and 0.961 -> 0.771 s (two calls), fp32 -11%, fp32 with AVX2 only
-9%; live memory +4..+14 MB (nothing saved for the backward but the weight itself). The sums run in another
order than oneDNN's, so outputs differ from `F.conv2d`'s in the last bits, as any two kernels' do.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .forwards import replaced_forwards
from .host_memory import trim

# weight elements / im2col matrix elements (input x k*k / stride^2) at which the product beats oneDNN's conv
# (benchmarks/RESULTS.md, bf16 on an AMX Xeon, forward + input gradient): 3x3 2560->1280 at 8x8 is 10 (5x
# faster), 1280->1280 at 16x16 2.5 (1.3x), the 1280 downsampler 8x8 -> 4x4 10 (2.6x), the 640 one 16x16 -> 8x8
# 5 (1.5x), 1x1 1280->1280 at 8x8 10 (1.4x); 3x3 640->640 at 16x16 1.25 and 1x1 640->640 at 16x16 1.25 are slower
MIN_RATIO = 2


def _out_size(n: int, k: int, s: int) -> int:
    return (n + 2 * (k // 2) - k) // s + 1


def _im2col(x: torch.Tensor, k: int, s: int = 1) -> torch.Tensor:
    """(B, C, H, W) -> (B*Ho*Wo, k*k*C), rows in (kh, kw, C) order, zero padding k // 2, stride s."""
    b, c, h, w = x.shape
    p, ho, wo = k // 2, _out_size(h, k, s), _out_size(w, k, s)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, p, p, p, p))  # (B, H+2p, W+2p, C)
    sb, sh, sw, sc = xp.stride()
    return xp.as_strided((b, ho, wo, k, k, c), (sb, s * sh, s * sw, sh, sw, sc)).reshape(b * ho * wo, k * k * c)


def _col2im(cols: torch.Tensor, shape, k: int, s: int = 1) -> torch.Tensor:
    """The adjoint of `_im2col`: each row's k*k*C values added back at their neighbourhood's places."""
    b, c, h, w = shape
    p, ho, wo = k // 2, _out_size(h, k, s), _out_size(w, k, s)
    d = cols.view(b, ho, wo, k, k, c)
    out = cols.new_zeros(b, h + 2 * p, w + 2 * p, c)
    for i in range(k):
        for j in range(k):
            out[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s] += d[:, :, :, i, j]
    return out[:, p:p + h, p:p + w].permute(0, 3, 1, 2)  # NCHW, channels-last in memory


class _GemmConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, matrix, bias, k, s):
        ctx.shape, ctx.matrix, ctx.k, ctx.s = x.shape, matrix, k, s  # the frozen weight: nothing else is kept
        cols = _im2col(x, k, s)
        y = cols @ matrix.t() if bias is None else torch.addmm(bias, cols, matrix.t())
        b, _, h, w = x.shape
        return y.view(b, _out_size(h, k, s), _out_size(w, k, s), -1).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        b, n, ho, wo = grad_out.shape
        g = grad_out.permute(0, 2, 3, 1).reshape(b * ho * wo, n).to(ctx.matrix.dtype)
        return _col2im(g @ ctx.matrix, ctx.shape, ctx.k, ctx.s), None, None, None, None


def _relayout(w: torch.Tensor, channels_last: bool) -> None:
    """`w`'s values rewritten in place into the (out, kh, kw, in) order (or back), and `w` made a view of
    that order: the same storage, so no second copy of the weight stays behind, whether it is the
    heap's or pages of a memory-mapped checkpoint (which a new tensor would leave resident beside it).
    The caller trims the temporary away."""
    o, c, kh, kw = w.shape
    flat = w.data.as_strided((w.numel(),), (1,))
    if channels_last:
        tmp = w.data.permute(0, 2, 3, 1).contiguous()
        flat.copy_(tmp.view(-1))
        w.data = flat.as_strided((o, c, kh, kw), (c * kh * kw, 1, kw * c, c))
    else:
        tmp = w.data.contiguous()
        flat.copy_(tmp.view(-1))
        w.data = flat.view(o, c, kh, kw)


def _lowerable(m: nn.Module) -> bool:
    k = m.kernel_size[0] if type(m) is nn.Conv2d else 0
    return (k % 2 == 1 and m.kernel_size == (k, k) and m.stride[0] == m.stride[1] and m.padding == (k // 2, k // 2)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros" and not m.weight.requires_grad
            and (m.bias is None or not m.bias.requires_grad))


def _wrap(m: nn.Module, min_ratio: float):
    forward = m.forward  # the class's, or one already wrapped (half storage's upcasting forward)

    def gemm_forward(x):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        w, k, s = m.weight, m.kernel_size[0], m.stride[0]
        if dev != "cpu" or w.dtype != dtype or x.dim() != 4:
            return forward(x)
        b, c, h, wd = x.shape
        if w.numel() < min_ratio * b * _out_size(h, k, s) * _out_size(wd, k, s) * k * k * c:  # vs the im2col rows
            return forward(x)
        if not w.is_contiguous(memory_format=torch.channels_last):  # once, on the first call that lowers
            if not w.is_contiguous():
                return forward(x)
            _relayout(w, channels_last=True)
            trim()  # the temporary copy's memory back to the OS, not kept in glibc's heap for the run
        o = w.shape[0]
        bias = None if m.bias is None else m.bias.to(dtype)
        return _GemmConv.apply(x.to(dtype), w.permute(0, 2, 3, 1).reshape(o, k * k * c), bias, k, s)

    return gemm_forward


@contextlib.contextmanager
def frozen_convs_as_gemm(model: nn.Module, enabled: bool = True, min_ratio: float | None = None):
    """Inside the block, each frozen conv of `model` with padding k // 2 whose weight (in the compute
    dtype, on the CPU) has `min_ratio` times as many elements as its im2col matrix computes as im2col + GEMM;
    afterwards every weight is back in its plain layout, the same values."""
    min_ratio = MIN_RATIO if min_ratio is None else min_ratio
    convs = [m for m in model.modules() if _lowerable(m)] if enabled else []
    with replaced_forwards([(m, _wrap(m, min_ratio)) for m in convs]) as n:
        try:
            yield n
        finally:
            for m in convs:
                if not m.weight.is_contiguous():
                    _relayout(m.weight, channels_last=False)
            trim()
