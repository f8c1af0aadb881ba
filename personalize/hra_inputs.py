"""HRA's reflections applied to a layer's input instead of its weight, while a run trains.

HRA (Yuan et al. 2024, "Bridging the gap between low-rank and orthogonal adaptation via Householder
reflection adaptation") adapts a frozen weight W as W H, with H = R_1 ... R_r a product of Householder
reflections R_i = I - 2 u_i u_i^T / |u_i|^2. peft's layer builds H (in x in, fp32) and then W H, a
full fp32 matrix product per layer per step, whose intermediates autograd keeps for the backward.
The output is the same with the reflections moved onto the input, since x (W H)^T = (x H^T) W^T
and H^T = R_r ... R_1: the input reflected r times (x - 2 (x.u) u^T, r cheap rank-1 updates) and then
the frozen layer as it is, in the compute dtype, with nothing weight-sized built or kept. Rounding
differs in the last bits of the compute dtype (peft rounds W H to bf16 under autocast, this x H^T);
in fp32 the two agree to float error (tests/test_hra_inputs.py). The adapter itself, its files and
every export are untouched: this is a forward only. Layers with Gram-Schmidt orthogonalisation
(`apply_GS`, not what `personalize hra` trains), several active adapters, merged or disabled
adapters keep peft's forward.
"""

from __future__ import annotations

import contextlib

import torch


def _is_hra_linear(m) -> bool:
    return type(m).__name__ == "HRALinear" and hasattr(m, "hra_u") and hasattr(m, "base_layer")


def _wrap(m, original):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in m.active_adapters if a in m.hra_u.keys()]
        if args or kwargs or m.disable_adapters or m.merged or len(active) != 1 or m.hra_apply_GS[active[0]]:
            return original(x, *args, **kwargs)
        u = m.hra_u[active[0]]
        u = u / u.norm(dim=0)
        y = x.to(u.dtype)
        for i in reversed(range(m.hra_r[active[0]])):  # x H^T = x R_r ... R_1: R_r first
            ui = u[:, i]
            y = y - 2 * (y @ ui).unsqueeze(-1) * ui
        return m.base_layer(y).to(x.dtype)

    return forward


@contextlib.contextmanager
def hra_on_inputs(models):
    """Inside the block, every HRA Linear layer of `models` reflects its input instead of building its
    weight; afterwards peft's forward is back. Yields how many layers it took."""
    layers = [m for model in models for m in model.modules() if _is_hra_linear(m)]
    before = [m.__dict__.get("forward") for m in layers]
    for m in layers:
        m.forward = _wrap(m, m.forward)
    try:
        yield len(layers)
    finally:
        for m, f in zip(layers, before):
            if f is None:
                del m.forward
            else:
                m.forward = f
