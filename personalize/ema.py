"""An exponential moving average of trained weights as a `fit.Hook` (`personalize ... --ema`,
`distill train --use-ema`): diffusers' `EMAModel`, updated after every optimizer step, its
effective decay at update t ``min(decay, (1 + t) / (10 + t))`` (t counted from 0: the first update
copies the weights).

Exact resume: just before fit writes the checkpoint of step N (`Hook.on_checkpoint`), the EMA of
step N is written to ``STATE_DIR/step-N.safetensors`` (the shadow weights; the scalars in the
header metadata); a resumed run's first update (step N+1) loads the state of step N first. States
older than the oldest kept checkpoint are removed. The average lives on the process that runs
hooks (rank 0) only.

`applied(models)` swaps the average into the models for a while (samples, scores, step saves) and
puts the trained weights back bit for bit; `copy_to` writes it into them for good (the outputs).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoints import list_checkpoints
from .errors import UserError
from .fileio import atomic_file

SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
ParamsFn = Callable[[dict], Iterable[torch.nn.Parameter]]  # fit's models -> the averaged parameters, in order


class WeightsEMA:
    """The EMA hook: ``__call__(step, models)`` after each optimizer step, ``save`` as the hook's
    `on_checkpoint`. `params` picks the averaged parameters from fit's models (in a fixed order);
    `run_dir` is the run whose checkpoints the states follow; `state_dir` where they are written."""

    def __init__(self, run_dir: Path, state_dir: Path, decay: float, params: ParamsFn, flag: str = "--ema"):
        # built on the first update: EMAModel's first update has decay 0, so starting from the
        # weights after step 1 is the same average as starting from the initial ones
        self.ema = None
        self.decay, self.params, self.flag = decay, params, flag
        self.run_dir, self.state_dir = Path(run_dir), Path(state_dir)

    def file(self, step: int) -> Path:
        return self.state_dir / f"step-{step:06d}.safetensors"

    def _build(self, models: dict) -> None:
        from diffusers.training_utils import EMAModel

        params = list(self.params(models))
        self.device = params[0].device
        self.ema = EMAModel(params, decay=self.decay)

    def _load(self, step: int) -> None:
        from safetensors import safe_open

        f = self.file(step)
        if not f.is_file():
            raise UserError(f"{self.flag}: no EMA state for step {step} ({f}) to resume from; was the run started "
                            f"without {self.flag}? (resume it with the flags it was started with)")
        try:
            with safe_open(str(f), framework="pt") as fh:
                meta = json.loads(fh.metadata()["ema"])
                shadow = [fh.get_tensor(f"shadow.{i}") for i in range(meta["n"])]
        except Exception as e:  # noqa: BLE001 - a damaged file of any kind is the same one line
            raise UserError(f"{f}: damaged EMA state ({type(e).__name__})") from None
        if len(shadow) != len(self.ema.shadow_params):
            raise UserError(f"{f}: {len(shadow)} EMA tensors, the run trains {len(self.ema.shadow_params)}")
        self.ema.load_state_dict({**{k: meta[k] for k in SCALARS}, "shadow_params": shadow})
        self.ema.to(device=self.device)

    def _start(self, models: dict, resumed_at: int) -> None:
        if self.ema is None:
            self._build(models)
            if resumed_at > 0:  # a resumed run: continue the average of the checkpoint it resumed from
                self._load(resumed_at)

    def __call__(self, step: int, models: dict) -> None:
        self._start(models, step - 1)
        self.ema.step(self.params(models))

    def save(self, step: int) -> Path:
        """The state of `step` (the hook's `on_checkpoint`)."""
        from safetensors.torch import save_file

        state = self.ema.state_dict()
        meta = {k: state[k] for k in SCALARS} | {"n": len(state["shadow_params"])}
        tensors = {f"shadow.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(state["shadow_params"])}
        dest = self.file(step)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(dest) as tmp:
            save_file(tensors, str(tmp), metadata={"ema": json.dumps(meta)})
        self.prune(keep=step)
        return dest

    def prune(self, keep: int | None = None) -> None:
        """Remove EMA states older than the oldest training checkpoint (and than `keep`)."""
        kept = [s for s, _ in list_checkpoints(self.run_dir)] + ([keep] if keep is not None else [])
        if not kept or not self.state_dir.is_dir():
            return
        for old in self.state_dir.glob("step-*.safetensors"):
            if old.stem[5:].isdigit() and int(old.stem[5:]) < min(kept):
                old.unlink(missing_ok=True)

    def copy_to(self, models: dict, last_step: int) -> None:
        """The average of `last_step` into `models` for good. A run resumed at its last step trained
        nothing more: its average is the one saved with that checkpoint."""
        self._start(models, last_step)
        self.ema.copy_to(self.params(models))

    @contextlib.contextmanager
    def applied(self, models: dict):
        """The average in `models` while inside, the trained weights back (exactly) afterwards."""
        params = list(self.params(models))
        raw = [p.detach().to("cpu", copy=True) for p in params]  # as EMAModel.store: off the device
        self.ema.copy_to(params)
        try:
            yield models
        finally:
            with torch.no_grad():
                for p, r in zip(params, raw):
                    p.copy_(r)
