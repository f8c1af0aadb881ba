"""Class images (`--class-images-runtime openvino`) and eval's protocol images (`eval --runtime
openvino`) drawn on CPU through OpenVINO.

The bare base is exported once to OpenVINO IR (`export_deploy`, fp32 weights) into the personalize
cache, keyed by base and resolution, and the diffusers pipeline runs on it (sources.load_pipeline:
the same scheduler loop, seeds and guidance as the torch path). It computes in bf16 where the CPU
runs bf16 natively (AVX512-BF16/AMX): 61.1 s vs the best torch CPU time's 188.5 s per 512 px
image, 0.32x (benchmarks/RESULTS.md, "Deploy runtimes"); elsewhere in fp32, which matches torch's
images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .backbones import ResolvedBase, cache_root
from .defaults import DEFAULT_SCHEDULER
from .errors import UserError
from .export.deploy import export_deploy
from .export.deploy.common import sizes
from .extras import require_extra
from .outputs import output_lock
from .precision import cpu_bf16_is_native
from .sources import export_source, load_pipeline


def inference_precision() -> str:
    return "bf16" if cpu_bf16_is_native() else "fp32"


def runtime_tag(runtime: str) -> str:
    """What the class-image cache key adds for `runtime`: '' for torch (its cache keeps its names),
    else the runtime and its compute precision (bf16 and fp32 images differ)."""
    return "" if runtime == "torch" else f"-{runtime}-{inference_precision()}"


def export_dir(base: ResolvedBase, resolution: int) -> Path:
    return cache_root() / "openvino" / f"{base.key}-{resolution}px"


def run_export_dir(run_dir: Path, resolution: int) -> Path:
    """Where `eval --runtime openvino` keeps a run's export: the personalize cache (never inside
    the run, which is its input), one folder per run folder and resolution."""
    run_dir = Path(run_dir).resolve()
    key = hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
    return cache_root() / "openvino" / "runs" / f"{run_dir.name}-{key}-{resolution}px"


def ensure_export(base: ResolvedBase, resolution: int, rebuild: bool = False) -> Path:
    """The cached OpenVINO export of `base` (ensure_openvino_export)."""
    return ensure_openvino_export(base.path, export_dir(base, resolution), resolution, rebuild)


def ensure_openvino_export(source: Path, out: Path, resolution: int, rebuild: bool = False,
                           run: dict | None = None) -> Path:
    """An fp32 OpenVINO export of `source` (a base, or a run: fused) kept at `out`, made on first use
    and made again when it is not intact, not of `run` (the run.json it must have been exported from)
    or `rebuild` (whole or absent: export_deploy builds it in a temp folder and renames it into place)."""
    import torch

    # several processes (ranks, parallel runs) wait for one export; a caller's autocast
    # would put autocast ops in the traced graphs, which OpenVINO cannot convert
    # (its own lock name: export_deploy takes the output's lock itself)
    with output_lock(out.with_name(out.name + ".build"), wait=True), torch.autocast("cpu", enabled=False):
        if rebuild or not intact(out, resolution, run):
            export_deploy(source, out, "openvino", resolution=resolution, overwrite=out.exists())
    return out


def intact(out: Path, resolution: int, run: dict | None = None) -> bool:
    """Whether a kept export can be trusted: its export.json reads as an fp32 OpenVINO export at
    `resolution` (sources.export_source checks its fields), of `run` when given (a run trained again
    since is exported again), and every part is there at the size it recorded (a truncated or
    missing model is rebuilt, not loaded)."""
    try:
        src = export_source(out)
    except UserError:
        return False
    rec = src.export if src is not None else None
    return (rec is not None and rec["format"] == "openvino" and rec["resolution"] == resolution
            and rec.get("weight_format") == "fp32" and rec.get("sizes") == sizes(out)
            and (run is None or rec.get("run") == run))


def openvino_source(source: Path, out: Path, resolution: int, flag: str, run: dict | None = None,
                    scheduler: str = DEFAULT_SCHEDULER, rebuild: bool = False):
    """The Source that draws through the OpenVINO export of `source` kept at `out` (made as
    ensure_openvino_export makes it), in bf16 where the CPU has it natively; nothing loaded."""
    require_extra("openvino", flag)
    return export_source(ensure_openvino_export(source, out, resolution, rebuild=rebuild, run=run),
                         scheduler=scheduler, inference_precision=inference_precision())


def openvino_class_pipeline(base: ResolvedBase, resolution: int):
    """A diffusers pipeline on the cached OpenVINO export of `base` (exported now if missing or
    damaged; a model that passes the checks but does not load is exported again, once)."""
    for again in (False, True):
        src = openvino_source(base.path, export_dir(base, resolution), resolution, "--class-images-runtime openvino",
                              rebuild=again)
        try:
            return load_pipeline(src)
        except UserError:
            if again:
                raise
