"""A quantized frozen base: QLoRA (Dettmers et al. 2023) for every adapter method that peft runs on it.

`--base-quantization nf4` holds the weight of every Linear layer of the frozen U-Net and text
encoder in bitsandbytes' 4-bit NormalFloat with double quantization (the block scales quantized
again: QLoRA's recipe); `int8` in bitsandbytes' row-wise absmax int8 (LLM.int8()'s storage).
The adapter trains in full precision on top; each layer dequantizes its weight inside its own
forward and backward, so the frozen base never exists in full precision again. Conv layers stay
as they are: bitsandbytes quantizes Linear layers only (`--cpu-half-weights` can hold the convs
in fp16 on a CPU without native bf16).

Which adapters are right on a quantized layer was checked against the same adapter on the
dequantized weight (outputs and gradients equal, tests/test_quantize.py): peft 0.21 runs LoRA,
DoRA, OFT and BOFT on NF4, and LoRA, LoHa, LoKr, OFT and BOFT on int8; `UNSUPPORTED` says why the
others are refused. The saved adapter is peft's own state dict of the adapter layers, the keys of
a run on the plain base, so it loads on the unquantized base like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError
from .host_memory import trim

if TYPE_CHECKING:
    import torch
    from torch import nn

# (quantization, method) -> why peft cannot train that adapter on such a layer (peft 0.21, bitsandbytes 0.50)
_PACKED = "peft builds its change in the shape of the base weight, which a packed 4-bit weight does not have"
UNSUPPORTED = {
    ("nf4", "loha"): _PACKED, ("nf4", "lokr"): _PACKED, ("nf4", "hra"): _PACKED,
    ("int8", "dora"): "peft's DoRA re-casts bitsandbytes' int8 weight each step and loses its scales "
                      "(the second step fails)",
    ("int8", "hra"): "peft's HRA multiplies the raw int8 values without their scales (wrong outputs, no error)",
}
# bitsandbytes 0.50's backends for these layers
DEVICES = ("cpu", "cuda", "xpu")


def check_quantization(method: str, quantization: str) -> None:
    """One line for a method that cannot train on the asked quantization (before anything loads)."""
    if quantization == "none":
        return
    if method == "full":
        raise UserError(f"--base-quantization {quantization}: quantizes the frozen base an adapter trains on; "
                        f"full finetuning trains every weight of it (use an adapter method, e.g. lora)")
    why = UNSUPPORTED.get((quantization, method))
    if why:
        ok = [q for q in ("nf4", "int8") if (q, method) not in UNSUPPORTED]
        raise UserError(f"--base-quantization {quantization} with {method}: {why}; "
                        + (f"use --base-quantization {ok[0]}" if ok else "use --base-quantization none"))


def check_backend(quantization: str, device) -> None:
    """One line where bitsandbytes cannot run these layers (a device it has no backend for, or no
    working install)."""
    import torch

    device = torch.device(device)
    if device.type not in DEVICES:
        raise UserError(f"--base-quantization {quantization}: bitsandbytes has no {device.type} backend for "
                        f"quantized layers (it runs on {', '.join(DEVICES)}); use --base-quantization none")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken native library raises anything
        raise UserError(f"--base-quantization {quantization}: bitsandbytes cannot run here "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _autocast_forward(self, x):
    """bitsandbytes' forward, its input first cast as autocast casts a Linear's: its matmul is an autograd
    Function autocast does not see, which returns the input's dtype (an fp32 time embedding under bf16
    autocast would reach bf16 norms in fp32)."""
    import torch

    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(dev))
    return type(self).forward(self, x)


def _quantized(linear: "nn.Linear", quantization: str, compute_dtype: "torch.dtype", device) -> "nn.Module":
    import bitsandbytes as bnb
    import torch
    from torch import nn

    w = linear.weight.detach()
    bias = linear.bias is not None
    with torch.device("meta"):  # the constructors' own random weights are never made
        if quantization == "nf4":
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
    if quantization == "nf4":
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True, module=q)
    else:
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    q = q.to(device)  # bitsandbytes quantizes on the move to the device
    if quantization == "nf4":
        # never bitsandbytes' AVX512-BF16 inference repacking (eval mode, no grad): it swaps the layer for a
        # forward-only kernel in place (no gradient reaches the layers below it) and undoes the double quantization
        q.support_avx512bf16_for_cpu = False
    # an instance attribute, as half_storage's: the layer's class stays bitsandbytes' own
    q.forward = _autocast_forward.__get__(q)
    if quantization == "int8":
        # the int8 values and their row scales move into the layer's state now rather than in its first
        # forward, where peft's adapters (which read the state) would find half of them
        q.init_8bit_state()
    q.train(linear.training)
    return q


def quantize_frozen(model: "nn.Module", quantization: str, compute_dtype: "torch.dtype", device,
                    rest_dtype: "torch.dtype | None" = None) -> int:
    """Replace every plain nn.Linear of `model` (frozen, before an adapter is attached) by its
    bitsandbytes layer on `device`, one layer at a time; cast the other floating parameters and
    buffers to `rest_dtype` (None: leave them). Returns the number of layers replaced."""
    from torch import nn

    if quantization == "none":
        return 0
    # names, not modules: each full-precision layer is freed as soon as its quantized one replaces it
    targets = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _quantized(getattr(owner, child), quantization, compute_dtype, device))
        trim()  # the freed full-precision weight back to the OS: glibc would keep it in its heap (a
        # bk-sdm-small base in bf16 measured 1.85 GB resident after NF4 instead of 1.37 GB)
    if rest_dtype is not None:
        for m in model.modules():
            if is_quantized(m):
                if m.bias is not None:
                    m.bias.data = m.bias.data.to(rest_dtype)
                continue
            for prm in m.parameters(recurse=False):
                if prm.is_floating_point():
                    prm.data = prm.data.to(rest_dtype)
            for key, buf in list(m.named_buffers(recurse=False)):
                if buf.is_floating_point():
                    setattr(m, key, buf.to(rest_dtype))
            if rest_dtype.itemsize > 2 and any(True for _ in m.parameters(recurse=False)):
                trim()  # a 16-bit load widened: its copy goes as each layer's wider one comes
    return len(targets)


def is_quantized(m: "nn.Module") -> bool:
    import bitsandbytes as bnb

    return isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def weight_bytes(m: "nn.Module") -> int:
    """Bytes of one Linear layer's weight as stored, its quantization statistics included."""
    w = m.weight
    n = w.numel() * w.element_size()
    qs = getattr(w, "quant_state", None)
    if qs is not None:  # NF4: block absmax (itself quantized), its own absmax, the code tables
        for t in (qs.absmax, qs.code, *((qs.state2.absmax, qs.state2.code) if qs.nested else ())):
            n += t.numel() * t.element_size()
    scales = getattr(getattr(m, "state", None), "SCB", None)
    if scales is not None:  # int8: one scale per output row
        n += scales.numel() * scales.element_size()
    return n
