"""Caption augmentation of a training step (`--caption-dropout`, `--shuffle-caption`,
`--keep-tokens`), as kohya's sd-scripts do it (`process_caption`): a caption is replaced by the
empty prompt with probability P; otherwise, with shuffling, its comma-separated parts are shuffled
except the first N and the part that names the subject (`{token} {class}`), which stay in place,
and joined with ", ".

Every draw comes from a `torch.Generator` handed in by the loss, so a step's captions are a
function of (seed, step, process) and `--resume` stays exact. Pure text: no models.
"""

from __future__ import annotations

import torch

SEPARATOR = ","  # kohya's caption_separator default


def host_generator(g: torch.Generator, micro: int) -> torch.Generator:
    """A CPU generator derived from the step's generator `g` (seeded by fit from (seed, step,
    process)) and the micro-step: the host-side choices of a step (which bucket, which caption
    variant) come from it without a device sync, and are the same after a resume."""
    return torch.Generator().manual_seed((g.initial_seed() * 1_000_003 + micro + 1) % (2**63 - 1))


def split_parts(caption: str) -> list[str]:
    return [s.strip() for s in caption.split(SEPARATOR) if s.strip()]


def shuffled(caption: str, keep_tokens: int, token: str, h: torch.Generator) -> str:
    """The caption's parts shuffled but the first `keep_tokens` and any naming `token`."""
    parts = split_parts(caption)
    fixed = [i < keep_tokens or token in p.split() for i, p in enumerate(parts)]
    free = [i for i, f in enumerate(fixed) if not f]
    if len(free) > 1:
        order = torch.randperm(len(free), generator=h).tolist()
        moved = [parts[free[k]] for k in order]
        for i, p in zip(free, moved):
            parts[i] = p
    return ", ".join(parts)


def vary(caption: str, h: torch.Generator, *, dropout: float, shuffle: bool, keep_tokens: int, token: str) -> str:
    """One step's variant of `caption`: the empty prompt with probability `dropout` (drawn first,
    whenever dropout is on), else shuffled when `shuffle`, else unchanged."""
    if dropout > 0 and float(torch.rand((), generator=h)) < dropout:
        return ""
    return shuffled(caption, keep_tokens, token, h) if shuffle else caption
