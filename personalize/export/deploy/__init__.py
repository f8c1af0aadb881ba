"""Deploy exports of a run where small Stable Diffusion runs without PyTorch: ONNX (onnxruntime),
OpenVINO IR (CPU servers, laptops) and Core ML (Mac/iPhone, Apple's ml-stable-diffusion layout).
A LoRA run is fused into its base first; full runs and `distill` pipelines convert as they are.
Everything is built in a temp folder and renamed into place: an export is whole or absent."""

from __future__ import annotations

import logging
from pathlib import Path

from ...errors import UserError
from ...defaults import COREML_ATTENTION, COREML_NBITS, DEPLOY_FORMATS, OPENVINO_WEIGHT_FORMATS
from ...extras import require_extra
from ...fileio import atomic_dir
from ...outputs import check_output, output_lock
from ...runs import resolution_error
from ...sources import Source, load_fused, resolve_source
from .common import write_common, write_record

__all__ = ["export_deploy"]


def export_deploy(run_dir: Path, out: Path, fmt: str, *, lora_scale: float = 1.0, base: str | None = None,
                  overwrite: bool = False, allow_pickle: bool = False, resolution: int | None = None,
                  weight_format: str = "fp32", quantize_nbits: int | None = 6, attention: str = "original",
                  bundle_resources: bool = False, vae_encoder: bool = False) -> Path:
    """RUN_DIR (LoRA run, full run or pipeline dir) -> OUT in `fmt`. `resolution` fixes Core ML's
    shapes (default the run's training resolution); ONNX/OpenVINO keep them dynamic."""
    if fmt not in DEPLOY_FORMATS:
        raise UserError(f"unknown deploy format '{fmt}' ({', '.join(DEPLOY_FORMATS)})")
    settings = _settings(fmt, weight_format, quantize_nbits, attention, bundle_resources)
    if vae_encoder:
        if fmt != "coreml":
            raise UserError("--vae-encoder applies to --format coreml (generate needs no encoder)")
        settings["vae_encoder"] = True
    if fmt == "coreml":  # coremltools logs its version checks to stderr as it is imported
        logging.getLogger("coremltools").setLevel(logging.ERROR)
    require_extra(fmt, f"--format {fmt}", ("nncf",) if settings.get("weight_format") == "int8" else ())
    run_dir, out = Path(run_dir), Path(out)
    src = resolve_source(run_dir, base=base, lora_scale=lora_scale)
    if src.export is not None:
        raise UserError(f"{run_dir}: already an {src.export['format']} export (its models are no torch modules to "
                        f"convert); export the run, base or pipeline it was made from ({src.export.get('from', '?')})")
    check_output(out, kind="dir", inputs=[run_dir, src.pipeline_dir], overwrite=overwrite)
    res = _resolution(src, resolution)
    if fmt == "coreml" and bundle_resources:
        from .coreml import check_bundle_tools

        check_bundle_tools()
    with output_lock(out):
        comps = load_fused(src, allow_pickle)
        with atomic_dir(out, replace=overwrite) as tmp:
            readme = _convert(fmt, comps, tmp, res, settings)
            write_common(tmp, comps, fmt, src)
            write_record(tmp, src, fmt, settings, res, readme)
    return out


def _settings(fmt: str, weight_format: str, quantize_nbits, attention: str, bundle_resources: bool) -> dict:
    if fmt == "openvino":
        if weight_format not in OPENVINO_WEIGHT_FORMATS:
            raise UserError(f"--weight-format {weight_format}: choose from {', '.join(OPENVINO_WEIGHT_FORMATS)}")
        return {"runtime": "openvino", "weight_format": weight_format}
    if fmt == "onnx":
        if weight_format != "fp32":
            raise UserError("--weight-format applies to --format openvino (the ONNX export is fp32)")
        return {"runtime": "onnx", "weight_format": "fp32"}
    if quantize_nbits is not None and quantize_nbits not in COREML_NBITS:
        raise UserError(f"--quantize-nbits {quantize_nbits}: choose from {', '.join(map(str, COREML_NBITS))} or none")
    if attention not in COREML_ATTENTION:
        raise UserError(f"--attention {attention}: choose from {', '.join(COREML_ATTENTION)}")
    return {"quantize_nbits": quantize_nbits, "attention": attention, "bundle_resources": bundle_resources}


def _resolution(src: Source, resolution: int | None) -> int:
    """--resolution, else the source's own; one line when out of range (the traced activations of
    a U-Net at 64k px would need terabytes), before any model is loaded."""
    if resolution is not None and (why := resolution_error(resolution)):
        raise UserError(f"--resolution {why}")
    return resolution or src.default_resolution()


def _convert(fmt: str, comps: dict, tmp: Path, res: int, settings: dict) -> str:
    if fmt == "onnx":
        from .onnx import README, write_onnx

        write_onnx(comps, tmp, res)
        return README
    if fmt == "openvino":
        from .openvino import README, write_openvino

        write_openvino(comps, tmp, res, settings["weight_format"])
        return README
    from .coreml import write_coreml

    return write_coreml(comps, tmp, res, settings)
