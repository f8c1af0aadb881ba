"""A module's forward replaced for the length of a block, and whatever it had put back after: the
one owner of swapping instance forwards (the kernel choices a run makes while it trains:
`gemm_convs`, `orthogonal_inputs`). No torch here."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable


@contextlib.contextmanager
def replaced_forwards(pairs: Iterable[tuple[object, Callable]]):
    """Inside the block each module of `pairs` runs the forward paired with it (made beforehand, so it
    may wrap the module's current one); afterwards the module's own again: its class's, or the instance
    forward it had (another wrapper's, such as half storage's), also when the block raises. Yields how
    many modules it took."""
    pairs = list(pairs)
    before = [m.__dict__.get("forward") for m, _ in pairs]
    for m, forward in pairs:
        m.forward = forward
    try:
        yield len(pairs)
    finally:
        for (m, _), f in zip(pairs, before):
            if f is None:
                del m.forward
            else:
                m.forward = f
