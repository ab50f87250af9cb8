"""Learning-rate schedules as pure functions of the step: lr(step) = lr_max × factor(step)."""

from __future__ import annotations

import math


def lr_factor(
    step: int, warmup_steps: int, kind: str, total_steps: int, min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    - ``inverse_sqrt``: linear warmup, then decay ∝ 1/√step, continuous at the peak. This is the
      paper's schedule (section 5.3) up to the constant: d_model^-0.5 · min(s^-0.5, s · w^-1.5).
    - ``cosine``: linear warmup, then half a cosine down to ``min_ratio`` at ``total_steps``.
    - ``constant``: linear warmup, then flat.
    """
    s = step + 1  # the first update already uses a non-zero rate
    if warmup_steps and s <= warmup_steps:
        return s / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "inverse_sqrt":
        return math.sqrt(max(warmup_steps, 1) / s)
    if kind == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((s - warmup_steps) / span, 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; choose inverse_sqrt, cosine or constant")
