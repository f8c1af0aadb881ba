"""`distill train --use-ema`: an exponential moving average of the student's weights, as BK-SDM's
``kd_train_text_to_image.py --use_ema`` keeps it (diffusers' `EMAModel`: decay 0.9999 with its
default warm-up, effective decay ``min(decay, (1 + t) / (10 + t))`` at update t), updated after
every optimizer step and saved as the output weights at the end.

The hook is personalize's (`personalize.ema.WeightsEMA`, shared with `personalize ... --ema`),
over every parameter of the student; its states go to ``OUT/ema/step-N.safetensors``, written
with each training checkpoint, so a resumed run continues the same average.
"""

from __future__ import annotations

from pathlib import Path

from personalize.ema import WeightsEMA

EMA_DIR = "ema"


def student_ema(out: Path, decay: float) -> WeightsEMA:
    return WeightsEMA(out, Path(out) / EMA_DIR, decay, lambda models: models["unet"].parameters(), flag="--use-ema")
