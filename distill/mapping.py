"""Which teacher weights initialise which student weights (BK-SDM, Kim et al. 2023).

The mapping is data: ``{student key prefix: teacher key prefix}``, one entry per module of the
student, computed from the two configs alone. The BK-SDM rule it encodes:

- down stage i keeps the teacher's first ``layers_per_block`` residual(+attention) pairs and its
  downsampler (the student's last down stage has none);
- an up stage has one more pair than a down stage; the student's first pairs come from the
  teacher's first pairs and its last pair from the teacher's *last* pair (for SD: pairs 1 and 3),
  because the last pair is the one fed by the previous stage's downsampler skip, so its input
  width only matches that pair;
- with the innermost stage removed (bk-tiny), student up stage i is teacher up stage i+1;
- stem, time embedding, mid block (when kept) and output head are copied as they are.

``check_coverage`` proves that every student tensor is covered by exactly one prefix, that the
teacher tensor it points at exists and has the same shape, and that no prefix is dead.
"""

from __future__ import annotations

from dataclasses import dataclass

from personalize.architectures import (
    StudentArch, clean_config, full_config, num_stages, student_config, teacher_layers_per_block,
)

# Top-level modules that exist only for some configs (class/addition embeddings, hidden-state
# projections): mapped one-to-one when the teacher has them.
_OPTIONAL_TOP = {
    "class_embedding": lambda c: c.get("class_embed_type") is not None or c.get("num_class_embeds") is not None,
    "add_embedding": lambda c: c.get("addition_embed_type") is not None,
    "encoder_hid_proj": lambda c: c.get("encoder_hid_dim") is not None,
}


class MappingError(ValueError):
    """The student/teacher key mapping does not cover the student exactly once with matching shapes."""


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def weight_mapping(teacher_cfg: dict, arch: StudentArch) -> dict[str, str]:
    """``{student prefix: teacher prefix}`` for `arch` derived from `teacher_cfg` (prefixes end in '.')."""
    t = full_config(teacher_cfg)
    s = student_config(t, arch)
    L, Ls = teacher_layers_per_block(t), s["layers_per_block"]
    n_t, n_s = num_stages(t), num_stages(s)
    offset = n_t - n_s  # up stages skipped at the innermost end

    m: dict[str, str] = {}
    for name in ("conv_in", "time_embedding", "conv_norm_out", "conv_out"):
        m[f"{name}."] = f"{name}."
    for name, present in _OPTIONAL_TOP.items():
        if present(t):
            m[f"{name}."] = f"{name}."

    for i, bt in enumerate(s["down_block_types"]):
        for j in range(Ls):
            m[f"down_blocks.{i}.resnets.{j}."] = f"down_blocks.{i}.resnets.{j}."
            if _has_attention(bt):
                m[f"down_blocks.{i}.attentions.{j}."] = f"down_blocks.{i}.attentions.{j}."
        if i < n_s - 1:
            m[f"down_blocks.{i}.downsamplers."] = f"down_blocks.{i}.downsamplers."

    if s.get("mid_block_type") is not None:
        m["mid_block."] = "mid_block."

    # student up pair j <- teacher up pair: first Ls pairs as they are, the last from the teacher's last
    pairs = list(range(Ls)) + [L]
    for i, bt in enumerate(s["up_block_types"]):
        ti = i + offset
        for j, tj in enumerate(pairs):
            m[f"up_blocks.{i}.resnets.{j}."] = f"up_blocks.{ti}.resnets.{tj}."
            if _has_attention(bt):
                m[f"up_blocks.{i}.attentions.{j}."] = f"up_blocks.{ti}.attentions.{tj}."
        if i < n_s - 1:
            m[f"up_blocks.{i}.upsamplers."] = f"up_blocks.{ti}.upsamplers."
    return m


@dataclass(frozen=True)
class Coverage:
    key_map: dict[str, str]  # every student state-dict key -> its teacher key
    unused_teacher_keys: list[str]  # teacher tensors the student drops (removed blocks)


def check_coverage(mapping: dict[str, str], student_shapes: dict[str, tuple], teacher_shapes: dict[str, tuple]) -> Coverage:
    """Resolve every student key through `mapping`; raise MappingError listing every problem:
    a student key no prefix covers, one covered by several, a missing teacher key, a shape
    mismatch, or a prefix that covers nothing."""
    problems: list[str] = []
    key_map: dict[str, str] = {}
    used: set[str] = set()
    for key, shape in student_shapes.items():
        hits = [p for p in mapping if key.startswith(p)]
        if not hits:
            problems.append(f"{key}: not covered")
            continue
        if len(hits) > 1:
            problems.append(f"{key}: covered {len(hits)} times ({', '.join(hits)})")
            continue
        p = hits[0]
        used.add(p)
        tkey = mapping[p] + key[len(p):]
        if tkey not in teacher_shapes:
            problems.append(f"{key} -> {tkey}: no such teacher tensor")
        elif tuple(teacher_shapes[tkey]) != tuple(shape):
            problems.append(f"{key} {tuple(shape)} -> {tkey} {tuple(teacher_shapes[tkey])}: shape mismatch")
        else:
            key_map[key] = tkey
    for p in mapping:
        if p not in used:
            problems.append(f"prefix {p} covers no student tensor")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise MappingError(f"{len(problems)} mapping problem(s): {shown}")
    unused = sorted(set(teacher_shapes) - set(key_map.values()))
    return Coverage(key_map, unused)


def shapes(module) -> dict[str, tuple]:
    """State-dict key -> shape (works on meta-device modules)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def init_student_from_teacher(teacher_unet, arch: StudentArch, device: str = "cpu"):
    """Build the `arch` student of `teacher_unet` with every tensor copied from the teacher.

    The student is created on the meta device and its tensors are then *assigned* from (copies
    of) the teacher's, so no random initialisation is ever computed (seconds for SD-size models).
    Returns ``(student_unet, coverage)``.
    """
    import torch
    from diffusers import UNet2DConditionModel

    tcfg = dict(teacher_unet.config)
    arch_cfg = student_config(tcfg, arch)
    mapping = weight_mapping(tcfg, arch)
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(clean_config(arch_cfg))
    teacher_sd = teacher_unet.state_dict()
    cov = check_coverage(mapping, shapes(student), shapes(teacher_unet))
    new_sd = {k: teacher_sd[tk].detach().to(device, copy=True) for k, tk in cov.key_map.items()}
    student.load_state_dict(new_sd, strict=True, assign=True)
    leftover = [n for n, t in [*student.named_parameters(), *student.named_buffers()] if t.is_meta]
    if leftover:  # a tensor outside the state dict (non-persistent buffer) would stay uninitialised
        raise MappingError(f"student tensors left uninitialised: {leftover[:5]}")
    return student, cov
