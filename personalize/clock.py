"""How a duration is shown (the fit loop's ETA, the app's ETA and train time): H:MM:SS."""

from __future__ import annotations

import math


def clock(seconds: float) -> str:
    """H:MM:SS; "-" when the duration is not known yet (NaN: no step timed so far)."""
    if not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
