"""Learning-rate schedules: lr = lr_max × factor(step, progress).

The decay of ``cosine`` and ``linear`` runs over a horizon in steps: the step budget
(``train.max_steps``) or, with ``train.decay_over: time``, the steps the wall-clock budget
(``train.max_minutes``) is worth, measured once by `tformer.training.stopping.TimeHorizon` and
kept in the train state. (``progress``, a fraction of the horizon given directly, is kept for
callers that drive the decay themselves; the loop does not use it.)
"""

from __future__ import annotations

import math


def lr_factor(
    step: int, warmup_steps: int, kind: str, total_steps: int, min_ratio: float = 0.0,
    progress: float | None = None,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    - ``inverse_sqrt``: linear warmup, then decay ∝ 1/√step, continuous at the peak. This is the
      paper's schedule (section 5.3) up to the constant: d_model^-0.5 · min(s^-0.5, s · w^-1.5).
    - ``cosine``: linear warmup, then half a cosine down to ``min_ratio`` at the horizon.
    - ``linear``: linear warmup, then a straight line down to ``min_ratio`` at the horizon.
    - ``constant``: linear warmup, then flat.

    ``progress`` (0 → 1), when given, replaces the step horizon: the decay is then a function of
    the time spent, multiplied by the warmup ramp (which stays counted in steps).
    """
    s = step + 1  # the first update already uses a non-zero rate
    if kind not in ("inverse_sqrt", "cosine", "linear", "constant"):
        raise ValueError(
            f"unknown schedule {kind!r}; choose inverse_sqrt, cosine, linear or constant"
        )
    warm = min(s / warmup_steps, 1.0) if warmup_steps else 1.0
    if kind == "constant":
        return warm
    if kind == "inverse_sqrt":
        return warm if s <= warmup_steps else math.sqrt(max(warmup_steps, 1) / s)
    if progress is None:
        if s <= warmup_steps:
            return warm
        span = max(total_steps - warmup_steps, 1)
        progress = (s - warmup_steps) / span
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return warm * (min_ratio + (1 - min_ratio) * decay)
