"""Which `personalize export` flags each format takes, what they default to, and the one dispatch.

A flag the chosen format does not take is refused in one line naming the flag and the format
(it used to be ignored: `--quantize-nbits 4 --format onnx` exported fp32 without a word). Only
flags the user gave count: the CLI passes None for every flag left out, the defaults live here.
"""

from __future__ import annotations

from pathlib import Path

from ..defaults import DEPLOY_FORMATS, EXPORT_FORMATS
from ..errors import UserError
from .deploy import export_deploy
from .kohya import export_kohya
from .lora_extract import export_lora
from .merged import export_merged
from .single_file import export_single_file

# format -> the options it takes, besides RUN_DIR, --format, -o and --overwrite (every format's)
_FUSED = ("lora_scale", "base", "allow_pickle")  # what loads a source and fuses its adapter
TAKES: dict[str, tuple[str, ...]] = {
    "kohya": ("names",),
    "lora": ("rank", "energy"),  # any run as a plain LoRA, or a LoRA resized (lora_extract.py)
    "merged": _FUSED,
    "single-file": (*_FUSED, "half"),
    "onnx": (*_FUSED, "resolution"),
    "openvino": (*_FUSED, "resolution", "weight_format"),
    "coreml": (*_FUSED, "resolution", "quantize_nbits", "attention", "vae_encoder", "bundle_resources"),
}
DEFAULTS = {"names": "diffusers", "lora_scale": 1.0, "base": None, "allow_pickle": False, "half": False, "rank": None, "energy": None,
            "resolution": None, "weight_format": "fp32", "quantize_nbits": 6, "attention": "original",
            "vae_encoder": False, "bundle_resources": False}
NO_PALETTE = "none"  # --quantize-nbits none: fp16 weights (None is "not given")


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def options(fmt: str, given: dict) -> dict:
    """Every option `fmt` takes, the user's value or the default; a one-line UserError for a flag
    given (not None) that `fmt` does not take."""
    if fmt not in TAKES:
        raise UserError(f"--format {fmt}: choose from {', '.join(EXPORT_FORMATS)}")
    for name, value in given.items():
        if name not in DEFAULTS:
            raise TypeError(f"export has no option {name!r}")
        if value is not None and name not in TAKES[fmt]:
            takes = [f for f, names in TAKES.items() if name in names]
            raise UserError(f"{flag(name)}: only for --format {'/'.join(takes)}; --format {fmt} does not take it")
    out = {n: DEFAULTS[n] if given.get(n) is None else given[n] for n in TAKES[fmt]}
    if out.get("quantize_nbits") == NO_PALETTE:
        out["quantize_nbits"] = None
    return out


def export(run_dir: Path, out: Path, fmt: str, overwrite: bool = False, **given):
    """`personalize export`: the format's exporter with the options checked and defaulted. Returns
    what the exporter returns (the output path; single-file: its SingleFile record)."""
    opts = options(fmt, given)
    if fmt in DEPLOY_FORMATS:
        return export_deploy(run_dir, out, fmt, overwrite=overwrite, **opts)
    fn = {"kohya": export_kohya, "lora": export_lora, "merged": export_merged, "single-file": export_single_file}[fmt]
    return fn(run_dir, out, overwrite=overwrite, **opts)
