"""Frozen weights stored in 16 bits, computed in fp32: LoRA's memory lever on CPUs.

On a GPU the frozen base of a LoRA run lives in fp16/bf16 and runs under autocast. A CPU without
native bf16 (no AVX512-BF16/AMX; see benchmarks/cpu_bf16.py) runs half-precision convolutions
65-95x slower than fp32, so there the base stays fp32 and costs 4 bytes a weight. Here every
frozen Linear/Conv2d keeps its weight in fp16 (2 bytes) and upcasts it to fp32 inside its own
forward and, again, inside its backward: autograd never holds the fp32 copy, so at most one layer's
fp32 weight exists at a time. Arithmetic stays fp32; only the weights are rounded to fp16 once
(10-bit mantissa, SD weights are far inside fp16's range).

`store_frozen_in_half(model)` converts a model in place (LoRA layers, which require grad, are left
alone); the converted model still runs in a pipeline (validation images) and its LoRA layers save as
usual. `restore_fp32(model)` undoes it, for a caller that wants the plain fp32 base back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STORAGE_DTYPE = torch.float16


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w16, bias):
        ctx.save_for_backward(w16)
        return F.linear(x, w16.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (w16,) = ctx.saved_tensors
        return grad_out @ w16.to(grad_out.dtype), None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w16, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(w16)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, w16.to(x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        (w16,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, w16.to(grad_out.dtype), grad_out, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None


def _linear_forward(self, x):
    if self.weight.dtype == STORAGE_DTYPE and x.dtype != STORAGE_DTYPE:
        return _Linear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def _conv_forward(self, x):
    if self.weight.dtype == STORAGE_DTYPE and x.dtype != STORAGE_DTYPE and self.padding_mode == "zeros":
        return _Conv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return self._conv_forward(x, self.weight, self.bias)


def _is_frozen_matmul(m: nn.Module) -> bool:
    return type(m) in (nn.Linear, nn.Conv2d) and not m.weight.requires_grad and (
        m.bias is None or not m.bias.requires_grad)


def store_frozen_in_half(model: nn.Module) -> int:
    """Keep the weight of every frozen Linear/Conv2d of `model` in fp16 and everything else (biases,
    norms, embeddings: little memory, cheap to keep exact) in fp32, whatever dtype the model was
    loaded in. Returns the number of weights stored in fp16."""
    n = 0
    for m in model.modules():
        matmul = _is_frozen_matmul(m)
        for name, prm in list(m.named_parameters(recurse=False)):
            want = STORAGE_DTYPE if matmul and name == "weight" else torch.float32
            if prm.is_floating_point() and prm.dtype != want:
                setattr(m, name, nn.Parameter(prm.detach().to(want), requires_grad=prm.requires_grad))
        for name, buf in list(m.named_buffers(recurse=False)):
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(m, name, buf.float())
        if matmul:
            n += m.weight.numel()
            # an instance attribute: only these modules change, their class stays plain nn.Linear/Conv2d
            m.forward = (_linear_forward if isinstance(m, nn.Linear) else _conv_forward).__get__(m)
    return n


def restore_fp32(model: nn.Module) -> None:
    """Back to plain fp32 modules (one layer at a time, so the peak stays that of the fp32 model)."""
    for m in model.modules():
        if "forward" in m.__dict__ and m.__dict__["forward"].__func__ in (_linear_forward, _conv_forward):
            del m.forward
            m.weight = nn.Parameter(m.weight.detach().float(), requires_grad=False)
