"""Class images drawn on CPU through OpenVINO (`--class-images-runtime openvino`).

The bare base is exported once to OpenVINO IR (`export_deploy`, fp32 weights) into the personalize
cache, keyed by base and resolution, and the diffusers pipeline runs on it (runtimes.py: the same
scheduler loop, seeds and guidance as the torch path). It computes in bf16 where the CPU runs bf16
natively (AVX512-BF16/AMX): 61.1 s vs the best torch CPU time's 188.5 s per 512 px image, 0.32x
(benchmarks/RESULTS.md, "Deploy runtimes"); elsewhere in fp32, which matches torch's images.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
from pathlib import Path
from typing import Iterator

from .backbones import ResolvedBase, cache_root
from .errors import UserError

CLASS_IMAGE_RUNTIMES = ("torch", "openvino")


def require_openvino() -> None:
    """One line naming the extra when the OpenVINO runtime is missing (checked before any loading)."""
    from .export.deploy.common import EXTRAS

    extra, modules = EXTRAS["openvino"]
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            raise UserError(f"--class-images-runtime openvino: needs the {m} package; install it with "
                            f"pip install -c requirements/lock.txt 'personalize[{extra}]'") from None


def inference_precision() -> str:
    from .precision import cpu_bf16_is_native

    return "bf16" if cpu_bf16_is_native() else "fp32"


def runtime_tag(runtime: str) -> str:
    """What the class-image cache key adds for `runtime`: '' for torch (its cache keeps its names),
    else the runtime and its compute precision (bf16 and fp32 images differ)."""
    return "" if runtime == "torch" else f"-{runtime}-{inference_precision()}"


def export_dir(base: ResolvedBase, resolution: int) -> Path:
    from .class_images import base_key

    return cache_root() / "openvino" / f"{base_key(base)}-{resolution}px"


@contextlib.contextmanager
def _wait_lock(path: Path) -> Iterator[None]:
    # a blocking lock: several training processes (ranks, parallel runs) wait for one export
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ensure_export(base: ResolvedBase, resolution: int) -> Path:
    """The cached OpenVINO export of `base`, made on first use (whole or absent: export_deploy
    builds it in a temp folder and renames it into place)."""
    import torch

    from .export.deploy import export_deploy, read_export

    out = export_dir(base, resolution)
    # a caller's autocast would put autocast ops in the traced graphs, which OpenVINO cannot convert
    with _wait_lock(out.with_name(out.name + ".lock")), torch.autocast("cpu", enabled=False):
        if read_export(out) is None:
            export_deploy(base.path, out, "openvino", resolution=resolution, overwrite=out.exists())
    return out


def openvino_class_pipeline(base: ResolvedBase, resolution: int):
    """A diffusers pipeline on the cached OpenVINO export of `base` (exported now if missing)."""
    from .pipeline import DEFAULT_SCHEDULER
    from .runtimes import load_runtime_pipeline

    require_openvino()
    return load_runtime_pipeline(ensure_export(base, resolution), "openvino", DEFAULT_SCHEDULER,
                                 precision=inference_precision())
