"""Exports of a finished run: `kohya` (one adapter file for AUTOMATIC1111 / ComfyUI / kohya) and
`merged` (the adapter fused into a complete diffusers pipeline)."""

from .kohya import export_kohya
from .merged import export_merged

FORMATS = ("kohya", "merged")

__all__ = ["FORMATS", "export_kohya", "export_merged"]
