"""Exports of a finished run: `kohya` (one adapter file for AUTOMATIC1111 / ComfyUI / kohya) and
`merged` (the adapter fused into a complete diffusers pipeline), `single-file` (one original-SD
checkpoint in the ldm layout of the real U-Net, for ComfyUI / AUTOMATIC1111)."""

from .kohya import export_kohya
from .merged import export_merged
from .single_file import export_single_file

from ..defaults import EXPORT_FORMATS as FORMATS

# onnx/openvino/coreml: personalize.export.deploy (imported lazily: it needs the optional extras)

__all__ = ["FORMATS", "export_kohya", "export_merged", "export_single_file"]
