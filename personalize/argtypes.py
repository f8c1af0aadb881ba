"""argparse types that refuse what would give garbage with exit 0 (`--guidance-scale inf` drew
black images; `--batch-size 0` was silently the default): finite floats in a range, ints in a
range, resolutions the VAE can take. argparse turns the ValueError into one line and exit 2."""

from __future__ import annotations

import argparse
import math
import re


def number(kind=float, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """A finite `kind` in [lo, hi] (lo excluded with lo_open)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if lo_open else '>='} {lo:g}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{text} must be <= {hi:g}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)


def resolution(text: str) -> int:
    v = number(int, 8)(text)
    if v % 8:
        raise argparse.ArgumentTypeError(f"{text} must be a multiple of 8 (the VAE's factor)")
    return v


def float_list(lo: float | None = None, hi: float | None = None):
    one = number(float, lo, hi)

    def parse(text: str) -> list[float]:
        items = [x for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected comma-separated numbers, got nothing")
        return [one(x.strip()) for x in items]

    parse.__name__ = "list"
    return parse


def key_values(kind=int):
    """'down_blocks.0.*=4,up_blocks.3.*=8' -> {'down_blocks.0.*': 4, 'up_blocks.3.*': 8}: peft's
    rank_pattern / alpha_pattern (a key is a regex matched against the end of a module's name),
    values positive."""
    one = number(kind, 0, lo_open=True)

    def parse(text: str) -> dict:
        out = {}
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            key, eq, value = item.rpartition("=")
            if not eq or not key.strip():
                raise argparse.ArgumentTypeError(f"'{item}' is not PATTERN=VALUE (e.g. down_blocks.0.*=4)")
            try:
                re.compile(key.strip())
            except re.error as e:
                raise argparse.ArgumentTypeError(f"'{key.strip()}' is not a regular expression ({e})") from None
            out[key.strip()] = one(value.strip())
        return out

    parse.__name__ = "patterns"
    return parse
