"""The installed stack against what this package supports.

The supported ranges are read from the package's own metadata (pyproject's `dependencies`, one
source of truth); `KNOWN_BAD` lists version combinations inside those ranges that were seen to
break a command. A training or generation command checks both at start-up (`check()`): a known-bad
combination is a one-line error with the `pip install` that fixes it; a version outside the
ranges is a one-line warning (it may work, it is not what the suite passed on).
No heavy imports: this runs before torch or diffusers are loaded.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from dataclasses import dataclass

from . import __version__
from .errors import UserError

DIST = "personalize"
# the packages whose releases have broken us before, or could: what `personalize env` lists
KEY_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors",
                "datasets", "tokenizers", "bitsandbytes")


@dataclass(frozen=True)
class KnownBad:
    """`package` at a version in `spec`, installed together with `other` in `other_spec`, breaks."""

    package: str
    spec: str
    other: str
    other_spec: str
    why: str
    fix: str  # the pip install that gets out of it


# Each entry was seen to fail, in scratch venvs on 2026-12-01 (torch 2.13 CPU). pip keeps them out
# of an install of ours, but an environment put together by hand (--no-deps, a later downgrade)
# can hold them; they get an error rather than the out-of-range warning, since they are certain.
KNOWN_BAD: list[KnownBad] = [
    KnownBad("diffusers", "<0.35.2", "transformers", ">=5", "diffusers fails to import (FLAX_WEIGHTS_NAME)",
             "'diffusers>=0.40,<0.43'"),
    KnownBad("peft", "<0.19", "transformers", ">=5",
             "peft 0.17 fails to import, 0.18 cannot load a text-encoder LoRA", "'peft>=0.19,<0.23'"),
    KnownBad("peft", "<0.17", "diffusers", ">=0.40", "diffusers refuses peft below 0.17", "'peft>=0.19,<0.23'"),
]


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def requirements() -> list:
    """This package's own (non-extra) requirements, as `packaging` Requirement objects."""
    from packaging.requirements import Requirement

    try:
        reqs = md.requires(DIST) or []
    except md.PackageNotFoundError:  # running from a source tree that was never installed
        return []
    out = []
    for line in reqs:
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            out.append(r)
    return out


def _contains(spec: str, version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(spec, prereleases=True)
    except InvalidVersion:
        return False


def problems(known_bad: list[KnownBad] | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings): one line each, naming the package, what is installed and what is supported."""
    errors, warnings = [], []
    for bad in KNOWN_BAD if known_bad is None else known_bad:
        v, ov = installed(bad.package), installed(bad.other)
        if v and ov and _contains(bad.spec, v) and _contains(bad.other_spec, ov):
            errors.append(f"{bad.package} {v} with {bad.other} {ov} is a known-bad combination ({bad.why}); "
                          f"fix: pip install {bad.fix}")
    for req in requirements():
        v = installed(req.name)
        if v is None:
            errors.append(f"{req.name} is not installed (supported: {req.specifier or 'any'}); "
                          f"fix: pip install '{req}'")
        elif req.specifier and not _contains(str(req.specifier), v.split("+")[0]):
            warnings.append(f"{req.name} {v} is outside the supported range {req.specifier}; "
                            f"if something breaks: pip install '{req}'")
    return errors, warnings


def check(known_bad: list[KnownBad] | None = None, stream=None) -> None:
    """Start-up check of a command that loads models: warnings to stderr, a known-bad pair or a
    missing dependency raises a UserError (one line, exit 2)."""
    errors, warnings = problems(known_bad)
    for w in warnings:
        print(f"warning: {w}", file=stream or sys.stderr)
    if errors:
        raise UserError(errors[0])


def report() -> list[tuple[str, str]]:
    """(name, value) rows for `personalize env`: versions, the torch build and the devices."""

    rows = [("personalize", __version__), ("python", sys.version.split()[0])]
    rows += [(name, installed(name) or "not installed") for name in KEY_PACKAGES]
    import torch

    rows.append(("torch build", f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB"))
    else:
        rows.append(("cuda", "not available"))
    from .precision import cpu_bf16_is_native

    rows.append(("cpu bf16", "native" if cpu_bf16_is_native() else "emulated (auto precision: fp32 on CPU)"))
    errors, warnings = problems()
    rows.append(("check", "; ".join(errors + warnings) or "ok: every dependency in its supported range"))
    return rows
