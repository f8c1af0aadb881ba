"""`distill train --use-ema`: an exponential moving average of the student's weights, as BK-SDM's
``kd_train_text_to_image.py --use_ema`` keeps it (diffusers' `EMAModel`: decay 0.9999 with its
default warm-up, effective decay ``min(decay, (1 + t) / (10 + t))`` at update t), updated after
every optimizer step and saved as the output weights at the end.

It runs as a `personalize.fit.Hook` (every step, main process). Exact resume: whenever a training
checkpoint is written at step N, the EMA state of step N is written beside it
(``OUT/ema/step-N.safetensors``: the shadow weights, the scalars in the header metadata); a
resumed run's first update (step N+1) loads the state of step N first. Files older than the
oldest kept checkpoint are removed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from personalize.errors import UserError
from personalize.fileio import atomic_file

EMA_DIR = "ema"
SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def ema_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / EMA_DIR / f"step-{step:06d}.safetensors"


class StudentEMA:
    """The EMA hook: ``__call__(step, models)`` after each optimizer step."""

    def __init__(self, run_dir: Path, decay: float, checkpoint_every: int, total_steps: int):
        # built on the first update, on the process that runs hooks (rank 0): the other ranks of a
        # launch never hold a copy. EMAModel's first update has decay 0, so starting from the
        # weights after step 1 is the same average as starting from the initial ones.
        self.ema = None
        self.decay = decay
        self.run_dir = Path(run_dir)
        self.checkpoint_every, self.total = checkpoint_every, total_steps
        self._started = False

    def _build(self, unet: torch.nn.Module) -> None:
        from diffusers.training_utils import EMAModel

        self.device = next(unet.parameters()).device
        self.ema = EMAModel(unet.parameters(), decay=self.decay)

    def _load(self, step: int) -> None:
        from safetensors import safe_open

        f = ema_file(self.run_dir, step)
        if not f.is_file():
            raise UserError(f"--use-ema: no EMA state for step {step} ({f}) to resume from; was the run started "
                            f"without --use-ema? (resume it with the flags it was started with)")
        try:
            with safe_open(str(f), framework="pt") as fh:
                meta = json.loads(fh.metadata()["ema"])
                shadow = [fh.get_tensor(f"shadow.{i}") for i in range(meta["n"])]
        except Exception as e:  # noqa: BLE001 - a damaged file of any kind is the same one line
            raise UserError(f"{f}: damaged EMA state ({type(e).__name__})") from None
        if len(shadow) != len(self.ema.shadow_params):
            raise UserError(f"{f}: {len(shadow)} EMA tensors, the student has {len(self.ema.shadow_params)}")
        self.ema.load_state_dict({**{k: meta[k] for k in SCALARS}, "shadow_params": shadow})
        self.ema.to(device=self.device)

    def save(self, step: int) -> Path:
        from safetensors.torch import save_file

        state = self.ema.state_dict()
        meta = {k: state[k] for k in SCALARS} | {"n": len(state["shadow_params"])}
        tensors = {f"shadow.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(state["shadow_params"])}
        dest = ema_file(self.run_dir, step)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(dest) as tmp:
            save_file(tensors, str(tmp), metadata={"ema": json.dumps(meta)})
        self.prune(keep=step)
        return dest

    def prune(self, keep: int | None = None) -> None:
        """Remove EMA states older than the oldest training checkpoint (and than `keep`)."""
        from personalize.checkpoints import list_checkpoints

        kept = [s for s, _ in list_checkpoints(self.run_dir)] + ([keep] if keep is not None else [])
        if not kept:
            return
        for old in (self.run_dir / EMA_DIR).glob("step-*.safetensors"):
            if old.stem[5:].isdigit() and int(old.stem[5:]) < min(kept):
                old.unlink(missing_ok=True)

    def __call__(self, step: int, models: dict) -> None:
        if not self._started:
            self._started = True
            self._build(models["unet"])
            if step > 1:  # a resumed run: continue the average of the checkpoint it resumed from
                self._load(step - 1)
        self.ema.step(models["unet"].parameters())
        if (self.checkpoint_every and step % self.checkpoint_every == 0) or step == self.total:
            self.save(step)

    def copy_to(self, unet: torch.nn.Module, last_step: int) -> None:
        """The averaged weights of `last_step` into `unet` (the output student). A run resumed at
        its last step trained nothing more: its average is the one saved with that checkpoint."""
        if not self._started:
            self._started = True
            self._build(unet)
            self._load(last_step)
        self.ema.copy_to(unet.parameters())
