"""When a run stops, and the horizon of its schedule when that is a time budget.

- ``train.max_steps``: the step budget.
- ``train.max_minutes``: a wall-clock budget, summed over resumes (`RunClock`); it is checked at
  every log line (``train.log_every``), where the processes already meet, so it costs no
  synchronisation of its own.
- ``train.early_stopping_patience``: validations without improvement.
- SIGINT / SIGTERM (`InterruptFlag`): finish the step, save, stop.

``train.decay_over: time`` does not make the schedule follow the clock. `TimeHorizon` measures
the time of a step once, at the end of the warm-up, and turns the remaining budget into a step
count, the horizon of the (step-driven) decay. The count is kept in ``TrainState`` so that a
resumed run decays over the same horizon.
"""

from __future__ import annotations

import logging
import math
import signal
import time

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tformer.training.checkpoint import TrainState

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is intact."""


class RunClock:
    """Wall-clock seconds spent in the training loop, evaluations included, summed over resumes:
    the clock of ``max_minutes`` and of `TimeHorizon`. ``sync`` folds the
    time since the last sync into ``TrainState.elapsed_seconds``; the loop syncs right before
    every checkpoint, so a resumed run goes on from the very second its checkpoint was taken."""

    def __init__(self) -> None:
        self.state: TrainState | None = None
        self.mark = 0.0

    def start(self, state: TrainState) -> None:
        self.state, self.mark = state, time.perf_counter()

    def seconds(self) -> float:
        if self.state is None:
            return 0.0
        return self.state.elapsed_seconds + time.perf_counter() - self.mark

    def sync(self) -> None:
        now = time.perf_counter()
        self.state.elapsed_seconds += now - self.mark
        self.mark = now


class TimeHorizon:
    """``decay_over: time``: the decay's horizon in steps, measured once.

    The time per step is measured from the end of the first step this process runs (which pays
    one-off costs: allocation, compilation) to the end of the warm-up (at least the second
    step): during the warm-up the horizon does not matter yet. The steps that the rest of the
    budget is worth at that pace are added to the step count; process 0's figure is sent to
    every process (one broadcast per run). Evaluations are not in the measurement: with many
    of them the budget stops the run somewhat before its decay reaches the floor."""

    def __init__(self, clock: RunClock, warmup_steps: int, max_minutes: float | None,
                 active: bool) -> None:
        self.clock, self.active = clock, active
        self.budget = 60 * max_minutes if max_minutes is not None else None
        self.measure_at = max(warmup_steps, 2)
        self.first: tuple[int, float] | None = None

    def observe(self, step: int, state: TrainState, accelerator: Accelerator) -> None:
        """Call at the end of optimizer step ``step`` (1-based), before the scheduler moves."""
        if not self.active or state.schedule_steps is not None:
            return
        now = self.clock.seconds()
        if self.first is None:
            self.first = (step, now)
            return
        if step < self.measure_at:
            return
        per_step = (now - self.first[1]) / (step - self.first[0])
        horizon = step + math.floor((self.budget - now) / per_step + 1e-9)
        if accelerator.num_processes > 1:
            horizon = broadcast_object_list([horizon], from_process=0)[0]
        state.schedule_steps = max(horizon, step + 1)
        log.info("decay_over: time: %.3g s per step over steps %d-%d; the %.1f min budget is "
                 "worth %d steps, the horizon of the learning-rate decay (max_minutes still "
                 "stops the run)", per_step, self.first[0] + 1, step, self.budget / 60,
                 state.schedule_steps)


def patience_exhausted(state: TrainState, patience: int | None) -> bool:
    return patience is not None and state.evals_without_improvement >= patience


class InterruptFlag:
    """SIGINT/SIGTERM finish the current step, then save and stop (a second one kills)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: finishing this step, then saving a checkpoint", signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
