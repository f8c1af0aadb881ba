"""Class images drawn on CPU through OpenVINO (`--class-images-runtime openvino`).

The bare base is exported once to OpenVINO IR (`export_deploy`, fp32 weights) into the personalize
cache, keyed by base and resolution, and the diffusers pipeline runs on it (sources.load_pipeline:
the same scheduler loop, seeds and guidance as the torch path). It computes in bf16 where the CPU
runs bf16 natively (AVX512-BF16/AMX): 61.1 s vs the best torch CPU time's 188.5 s per 512 px
image, 0.32x (benchmarks/RESULTS.md, "Deploy runtimes"); elsewhere in fp32, which matches torch's
images.
"""

from __future__ import annotations

from pathlib import Path

from .backbones import ResolvedBase, cache_root
from .defaults import DEFAULT_SCHEDULER
from .errors import UserError
from .export.deploy import export_deploy
from .extras import require_extra
from .outputs import output_lock
from .precision import cpu_bf16_is_native
from .runtimes import read_export
from .sources import export_source, load_pipeline


def inference_precision() -> str:
    return "bf16" if cpu_bf16_is_native() else "fp32"


def runtime_tag(runtime: str) -> str:
    """What the class-image cache key adds for `runtime`: '' for torch (its cache keeps its names),
    else the runtime and its compute precision (bf16 and fp32 images differ)."""
    return "" if runtime == "torch" else f"-{runtime}-{inference_precision()}"


def export_dir(base: ResolvedBase, resolution: int) -> Path:
    return cache_root() / "openvino" / f"{base.key}-{resolution}px"


def ensure_export(base: ResolvedBase, resolution: int) -> Path:
    """The cached OpenVINO export of `base`, made on first use (whole or absent: export_deploy
    builds it in a temp folder and renames it into place)."""
    import torch

    out = export_dir(base, resolution)
    # several training processes (ranks, parallel runs) wait for one export; a caller's autocast
    # would put autocast ops in the traced graphs, which OpenVINO cannot convert
    # (its own lock name: export_deploy takes the output's lock itself)
    with output_lock(out.with_name(out.name + ".build"), wait=True), torch.autocast("cpu", enabled=False):
        if _read(out) is None:
            export_deploy(base.path, out, "openvino", resolution=resolution, overwrite=out.exists())
    return out


def _read(out: Path) -> dict | None:
    try:
        return read_export(out)
    except UserError:  # a damaged export.json: the cache is rebuilt
        return None


def openvino_class_pipeline(base: ResolvedBase, resolution: int):
    """A diffusers pipeline on the cached OpenVINO export of `base` (exported now if missing)."""
    require_extra("openvino", "--class-images-runtime openvino")
    src = export_source(ensure_export(base, resolution), scheduler=DEFAULT_SCHEDULER,
                        inference_precision=inference_precision())
    return load_pipeline(src)
