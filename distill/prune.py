"""`distill prune`: build a BK-SDM student pipeline by block removal (Kim et al. 2023, Sec. 3.1).

The student U-Net is the teacher's with blocks removed (`personalize.architectures.student_config`),
every tensor initialised from the teacher (`mapping.init_student_from_teacher`). The output
directory is a complete diffusers pipeline (the teacher's VAE, text encoder, tokenizer, scheduler + the
student U-Net), written as safetensors into a temporary sibling and renamed into place, so a
crash never leaves a half-written pipeline where `personalize --base DIR` could pick it up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from personalize.architectures import TEACHER_UNET_CONFIGS, ArchReport, StudentArch, get_arch, report, student_config
from personalize import outputs
from personalize.errors import UserError, one_line
from personalize.fileio import atomic_dir
from personalize.sources import load_diffusers_pipeline, load_unet, resolve_base

from .mapping import init_student_from_teacher, weight_mapping

PROVENANCE_FILE = "distill.json"  # written into every pipeline dir this package produces


def teacher_unet_config(teacher: str) -> dict:
    """The teacher U-Net config with no weights read: an embedded config for the registry's SD
    teachers, otherwise ``unet/config.json`` of the pipeline directory that
    `personalize.sources.resolve_base` finds for `--teacher` (local dir, HF cache or hub)."""
    p = Path(teacher).expanduser()
    if not p.exists() and teacher in TEACHER_UNET_CONFIGS:
        return dict(TEACHER_UNET_CONFIGS[teacher])
    return _read_unet_config(resolve_base(teacher, flag="--teacher").path)


def _read_unet_config(pipeline_dir: Path) -> dict:
    f = pipeline_dir / "unet" / "config.json"
    if not f.is_file():
        raise UserError(f"{pipeline_dir}: no unet/config.json")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{f}: not valid JSON ({one_line(e)})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f}: not a U-Net config (a JSON {type(cfg).__name__}, not an object)")
    return cfg


def checked_student_config(tcfg: dict, arch: StudentArch, teacher: str) -> dict:
    """`student_config`, with a teacher the recipe cannot prune reported as a one-line UserError."""
    try:
        return student_config(tcfg, arch)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"teacher {teacher}: cannot build {arch.name} from its U-Net config ({e})") from None


def dry_run(teacher: str, arch_name: str, resolution: int = 512) -> tuple[ArchReport, ArchReport]:
    """Parameter counts and U-Net MACs per denoising step of teacher and student (meta device)."""
    arch = get_arch(arch_name)
    tcfg = teacher_unet_config(teacher)
    scfg = checked_student_config(tcfg, arch, teacher)
    return report(tcfg, "teacher", resolution), report(scfg, arch.name, resolution)


def check_output(out: Path, overwrite: bool, flag: str = "-o", inputs=()) -> Path:
    """personalize's output check (not an input, right kind, writable, no symlink), where an
    existing *empty* folder counts as free (cheap; run first)."""
    out = Path(out).expanduser()
    empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    return outputs.check_output(out, kind="dir", inputs=inputs, flag=flag, overwrite=overwrite,
                                allow_existing_dir=empty_dir)


def save_pipeline_atomic(pipeline, out: Path, extra_files: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """`pipeline.save_pretrained` (safetensors) into a temp sibling of `out`, then renamed into place."""
    out = check_output(out, overwrite).resolve()
    from personalize.pipeline import save_pretrained

    with atomic_dir(out, replace=True) as tmp:
        save_pretrained(pipeline, tmp)  # safetensors; text encoder in transformers 4.x names too
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


@dataclass(frozen=True)
class PruneResult:
    out: Path
    teacher: ArchReport
    student: ArchReport
    dropped_teacher_tensors: int


def provenance(teacher: str, teacher_path: Path, arch: StudentArch, tcfg: dict, **extra) -> dict:
    return {
        "method": "BK-SDM block removal (Kim et al. 2023)",
        "teacher": teacher,
        "teacher_path": str(teacher_path),
        "arch": asdict(arch),
        "weight_mapping": weight_mapping(tcfg, arch),
        **extra,
    }


def prune(teacher: str, arch_name: str, out: Path, overwrite: bool = False, allow_pickle: bool = False,
          log=print) -> PruneResult:
    """Write the `arch_name` student of `teacher` as a pipeline directory at `out`."""
    arch = get_arch(arch_name)
    out = check_output(out, overwrite)
    tpath = resolve_base(teacher, flag="--teacher").path
    with outputs.output_lock(out):  # a second `distill prune -o OUT` is refused, naming this one
        return _prune(teacher, tpath, arch, out, overwrite, allow_pickle, log)


def _prune(teacher: str, tpath: Path, arch: StudentArch, out: Path, overwrite: bool, allow_pickle: bool,
           log) -> PruneResult:
    # under the lock: the student is never written over its teacher, nor over what another writer left
    check_output(out, overwrite, inputs=[tpath])
    log(f"teacher {teacher} -> {tpath}")
    checked_student_config(_read_unet_config(tpath), arch, teacher)  # before reading any weights
    teacher_unet = load_unet(tpath, allow_pickle)
    tcfg = dict(teacher_unet.config)
    student, cov = init_student_from_teacher(teacher_unet, arch)
    del teacher_unet  # SD-size teachers: keep peak memory to one U-Net plus the student
    rt, rs = report(tcfg, "teacher"), report(student_config(tcfg, arch), arch.name)
    log(rt.line())
    log(rs.line(rt))
    log(f"every student tensor initialised from the teacher; {len(cov.unused_teacher_keys)} teacher tensors dropped")
    pipe = load_diffusers_pipeline(tpath, allow_pickle, unet=student)
    meta = provenance(teacher, tpath, arch, tcfg, unet_params=rs.params, teacher_unet_params=rt.params,
                      unet_macs_512=rs.macs.total, teacher_unet_macs_512=rt.macs.total)
    final = save_pipeline_atomic(pipe, out, {PROVENANCE_FILE: json.dumps(meta, indent=1)}, overwrite=overwrite)
    log(f"wrote {final}")
    return PruneResult(final, rt, rs, len(cov.unused_teacher_keys))
