"""Knowledge distillation objective of BK-SDM (Kim et al. 2023, Sec. 3.2).

    L = λ_sd · L_task + λ_kd_out · L_outKD + λ_kd_feat · L_featKD

- ``L_task``   (``loss_sd``):      MSE(ε_student(z_t, y, t), target), the usual denoising loss
  (target: the noise ε, or the velocity for v-prediction teachers);
- ``L_outKD``  (``loss_kd_out``):  MSE(ε_student, ε_teacher) on the same noisy latent, text and t;
- ``L_featKD`` (``loss_kd_feat``): Σ over stage pairs of MSE(f_student, f_teacher), where f is the
  output of a U-Net stage, captured with forward hooks.

Stage pairs: for students that keep every stage (bk-base, bk-small, full) each down stage and each
up stage is paired with the teacher's stage of the same name; a down stage's output is the tuple
``(hidden, res_samples)``, and ``hidden`` is the feature. When the innermost stage is removed
(bk-tiny), student up stage i is teacher up stage i+1, and the student's last down stage, which
lost its downsampler, is paired *before* the teacher's downsampler: the last attention's
``proj_out`` on both sides (the BK-SDM reference's choice), or the last resnet for plain stages.
The stage features are not projected: block removal keeps every stage's width, so shapes match.

The teacher runs frozen (eval, no grad, possibly half precision); only the student learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from personalize.architectures import full_config, num_stages, teacher_layers_per_block
from personalize.diffusion import noise_latents

from .config import KDWeights


@dataclass(frozen=True)
class FeaturePair:
    student: str  # module name in the student U-Net whose output is the feature
    teacher: str  # module name in the teacher U-Net


def _last_stage_feature(cfg: dict, i: int) -> str:
    lpb = cfg["layers_per_block"]
    n = lpb if isinstance(lpb, int) else lpb[i]
    if "Attn" in cfg["down_block_types"][i]:
        return f"down_blocks.{i}.attentions.{n - 1}.proj_out"
    return f"down_blocks.{i}.resnets.{n - 1}"


def feature_pairs(teacher_cfg: dict, student_cfg: dict) -> list[FeaturePair]:
    """The stage pairs of the feature-KD loss, from the two U-Net configs (see module doc)."""
    t, s = full_config(teacher_cfg), full_config(student_cfg)
    teacher_layers_per_block(t)
    n_t, n_s = num_stages(t), num_stages(s)
    offset = n_t - n_s
    if offset not in (0, 1):
        raise ValueError(f"student has {n_s} stages, teacher {n_t}: not a BK-SDM student of this teacher")
    if list(s["block_out_channels"]) != list(t["block_out_channels"])[:n_s]:
        raise ValueError(f"student widths {s['block_out_channels']} are not the teacher's {t['block_out_channels']}")
    # both U-Nets see the same noisy latent and the same text embedding (the student's encoder)
    for k in ("in_channels", "out_channels", "cross_attention_dim"):
        if s[k] != t[k] and not (k == "cross_attention_dim" and _per_stage(s[k], n_s) == _per_stage(t[k], n_s)):
            raise ValueError(f"student {k} {s[k]} differs from the teacher's {t[k]} (another SD family?)")
    pairs = []
    for i in range(n_s):
        if offset and i == n_s - 1:
            pairs.append(FeaturePair(_last_stage_feature(s, i), _last_stage_feature(t, i)))
        else:
            pairs.append(FeaturePair(f"down_blocks.{i}", f"down_blocks.{i}"))
    for i in range(n_s):
        pairs.append(FeaturePair(f"up_blocks.{i}", f"up_blocks.{i + offset}"))
    return pairs


def _per_stage(v, n: int) -> list:
    """A per-stage config value as a list over the first `n` stages (ints are the same everywhere)."""
    return list(v)[:n] if isinstance(v, (list, tuple)) else [v] * n


def stage_output(out) -> torch.Tensor:
    """The feature tensor of a hooked module's output: down stages return (hidden, res_samples),
    transformer blocks may return a tuple or an output object."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return stage_output(out[0])
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot take a feature from {type(out).__name__}")


class FeatureCapture:
    """Forward hooks that keep the latest output of the named submodules of `module`.

    Register on the plain module (before any DDP/accelerate wrapping): hooks on submodules fire
    whatever wraps the parent. Use as a context manager, or call ``remove()``.
    """

    def __init__(self, module: nn.Module, names: list[str]):
        modules = dict(module.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no such module(s) to hook: {', '.join(missing)}")
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_mod, _inp, out):
            self.features[name] = stage_output(out)

        return hook

    def clear(self):
        self.features.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.features:
            raise KeyError(f"{name} was not run in the last forward pass")
        return self.features[name]

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def kd_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor, target: torch.Tensor,
            student_feats: FeatureCapture, teacher_feats: FeatureCapture, pairs: list[FeaturePair],
            weights: KDWeights) -> dict[str, torch.Tensor]:
    """The three BK-SDM loss parts and their weighted sum, all in fp32 (mixed-precision safe)."""
    loss_sd = F.mse_loss(student_pred.float(), target.float())
    loss_kd_out = F.mse_loss(student_pred.float(), teacher_pred.float())
    loss_kd_feat = sum(
        (F.mse_loss(student_feats[p.student].float(), teacher_feats[p.teacher].detach().float()) for p in pairs),
        start=torch.zeros((), device=student_pred.device),
    )
    loss = weights.lambda_sd * loss_sd + weights.lambda_kd_out * loss_kd_out + weights.lambda_kd_feat * loss_kd_feat
    return {"loss": loss, "loss_sd": loss_sd.detach(), "loss_kd_out": loss_kd_out.detach(),
            "loss_kd_feat": loss_kd_feat.detach()}


class Distiller:
    """One KD forward: noise the latents, run student and teacher, return the loss parts.

    Holds the frozen teacher and both feature captures; the student is passed per call because
    `fit` hands over its accelerate-prepared (possibly DDP-wrapped) module.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, scheduler, pairs: list[FeaturePair],
                 weights: KDWeights):
        teacher.eval().requires_grad_(False)
        self.teacher, self.scheduler, self.pairs, self.weights = teacher, scheduler, pairs, weights
        self.student_feats = FeatureCapture(student, [p.student for p in pairs])
        self.teacher_feats = FeatureCapture(teacher, [p.teacher for p in pairs])

    def __call__(self, student: nn.Module, latents: torch.Tensor, text_emb: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        # every draw from `generator` (seeded per step by fit) so that resume replays the same noise
        x = noise_latents(self.scheduler, latents, generator)
        noisy, t, target = x.noisy, x.timesteps, x.target
        self.student_feats.clear()
        self.teacher_feats.clear()
        student_pred = student(noisy, t, text_emb).sample
        tdtype = next(self.teacher.parameters()).dtype
        # no_grad, not inference_mode: teacher features enter the student's loss graph, and
        # inference tensors cannot be saved for backward
        with torch.no_grad():
            teacher_pred = self.teacher(noisy.to(tdtype), t, text_emb.to(tdtype)).sample
        losses = kd_loss(student_pred, teacher_pred, target, self.student_feats, self.teacher_feats, self.pairs,
                         self.weights)
        # the autograd graph keeps what backward needs; holding the stage outputs here as well
        # would pin a batch of activations (~0.5 GB at 64 x 512 px) until the next step
        self.student_feats.clear()
        self.teacher_feats.clear()
        return losses

    def remove_hooks(self):
        self.student_feats.remove()
        self.teacher_feats.remove()
