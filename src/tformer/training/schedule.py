"""Learning-rate schedules: lr = lr_max × factor(step, progress).

The decay of ``cosine`` and ``linear`` runs over a horizon in steps: the step budget
(``train.max_steps``) or, with ``train.decay_over: time``, the steps the wall-clock budget
(``train.max_minutes``) is worth, measured by `tformer.training.stopping.TimeHorizon` at the
end of the warm-up and again every tenth of the budget, and kept in the train state. A new
horizon does not restart the decay: its progress goes on from where it is, on a straight line
to 1 at the new horizon (`decay_progress`), so the rate never jumps.
"""

from __future__ import annotations

import math


def lr_factor(
    step: int, warmup_steps: int, kind: str, total_steps: int, min_ratio: float = 0.0,
    progress: float | None = None, start: tuple[int, float] | None = None,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    - ``inverse_sqrt``: linear warmup, then decay ∝ 1/√step, continuous at the peak. This is the
      paper's schedule (section 5.3) up to the constant: d_model^-0.5 · min(s^-0.5, s · w^-1.5).
    - ``cosine``: linear warmup, then half a cosine down to ``min_ratio`` at the horizon.
    - ``linear``: linear warmup, then a straight line down to ``min_ratio`` at the horizon.
    - ``constant``: linear warmup, then flat.

    ``start`` (step, progress): where the decay's current line starts (`decay_progress`; None:
    the end of the warm-up). ``progress`` (0 → 1), when given, replaces the step horizon: the
    decay is then a function of whatever the caller measures, times the warmup ramp (which
    stays counted in steps).
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
        progress = decay_progress(s, warmup_steps, total_steps, start)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return warm * (min_ratio + (1 - min_ratio) * decay)


def decay_progress(step: int, warmup_steps: int, total_steps: int,
                   start: tuple[int, float] | None = None) -> float:
    """How far the decay is at optimizer step ``step`` (1-based), 0 -> 1: on the line from
    ``start`` (step, progress; None: the end of the warm-up, progress 0) to 1 at
    ``total_steps``. Clamped to [0, 1]."""
    at, progress = start if start is not None else (warmup_steps, 0.0)
    span = max(total_steps - at, 1)
    return min(max(progress + (1.0 - progress) * (step - at) / span, 0.0), 1.0)
