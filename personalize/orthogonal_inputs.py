"""HRA's and BOFT's rotations applied to a layer's input as they are, without building in x in matrices,
while a run trains.

Both adapt a frozen weight W by an orthogonal matrix on its input side, y = base(x R) (HRA writes it
W H, R = H^T). peft builds R densely every forward: for HRA (Yuan et al. 2024, "Bridging the gap
between low-rank and orthogonal adaptation via Householder reflection adaptation") H = R_1 ... R_r from
r Householder reflections R_i = I - 2 u_i u_i^T / |u_i|^2 as an in x in fp32 matrix and then W H, a full
product per layer per step; for BOFT (Liu et al. 2024, "Parameter-efficient orthogonal finetuning via
butterfly factorization") each butterfly factor P B P^T, B block-diagonal of Cayley rotations, as dense
in x in matrices multiplied together (two in^3 products per factor for permutation matrices). Applied
to x directly, the same rotation is r rank-1 updates (HRA: x H^T = x R_r ... R_1) or, per factor, a
gather, D small (H x H) block products and a gather back (BOFT), then the frozen layer as it is, with
nothing weight-sized built or kept for the backward. In fp32 outputs and gradients are peft's to float
error; in bf16 the rounding differs in its last bits (tests/test_orthogonal_inputs.py). Adapters, their
files and exports are untouched: this replaces a forward only. Gram-Schmidt HRA (`apply_GS`), several
active adapters, merged or disabled adapters keep peft's forward.
"""

from __future__ import annotations

import torch

from .forwards import replaced_forwards


def _active(m, params) -> str | None:
    active = [a for a in m.active_adapters if a in params.keys()]
    return active[0] if len(active) == 1 and not m.disable_adapters and not m.merged else None


def _hra(m, original):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a = _active(m, m.hra_u)
        if a is None or args or kwargs or m.hra_apply_GS[a]:
            return original(x, *args, **kwargs)
        u = m.hra_u[a] / m.hra_u[a].norm(dim=0)
        y = x.to(u.dtype)
        for i in reversed(range(m.hra_r[a])):  # x H^T = x R_r ... R_1: R_r first
            y = y - 2 * (y @ u[:, i]).unsqueeze(-1) * u[:, i]
        return m.base_layer(y).to(x.dtype)

    return forward


def _permutations(p: torch.Tensor) -> list:
    """Each factor's permutation matrix P (constant) as the indices of x P and of . P^T, read once per
    block rather than every step (column j of P holds its 1 in row argmax); None for the identity."""
    ident = torch.arange(p.shape[-1], device=p.device)
    return [None if torch.equal(q.argmax(dim=0), ident) else (q.argmax(dim=0), q.argmax(dim=1)) for q in p]


def _boft(m, original):
    perms = _permutations(m.boft_P)

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a = _active(m, m.boft_R)
        if a is None or args or kwargs:
            return original(x, *args, **kwargs)
        n, d, h, _ = m.boft_R[a].shape
        blocks = m.boft_dropout[a](m.cayley_batch(m.boft_R[a].view(n * d, h, h)).view(n, d, h, h)).to(x.dtype)
        y = x
        for i in reversed(range(n)):  # R = F_{n-1} ... F_0 with F_i = P_i B_i P_i^T: x F_{n-1} first
            y = y if perms[i] is None else y[..., perms[i][0]]  # x P
            y = torch.einsum("...dh,dhk->...dk", y.unflatten(-1, (d, h)), blocks[i]).flatten(-2)
            y = y if perms[i] is None else y[..., perms[i][1]]  # . P^T
        result = m.base_layer(y)
        bias = m.base_layer.bias
        scale = m.boft_s[a].squeeze(-1)
        result = (result - bias) * scale + bias if bias is not None else result * scale
        return result.to(x.dtype)

    return forward


def _kind(m):
    name = type(m).__name__
    if name == "HRALinear" and hasattr(m, "hra_u"):
        return _hra
    if name == "Linear" and hasattr(m, "boft_R") and hasattr(m, "boft_P"):
        return _boft
    return None


def orthogonal_on_inputs(models):
    """Inside the block, every HRA and BOFT Linear layer of `models` rotates its input itself; afterwards
    peft's forward is back. Yields how many layers it took."""
    return replaced_forwards([(m, kind(m, m.forward)) for model in models for m in model.modules()
                              if (kind := _kind(m)) is not None])
