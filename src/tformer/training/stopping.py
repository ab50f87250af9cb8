"""When a run stops, and the horizon of its schedule when that is a time budget.

- ``train.max_steps``: the step budget.
- ``train.max_minutes``: a wall-clock budget, summed over resumes (`RunClock`); it is checked at
  every log line (``train.log_every``), where the processes already meet, so it costs no
  synchronisation of its own.
- ``train.early_stopping_patience``: validations without improvement.
- SIGINT / SIGTERM (`InterruptFlag`): finish the step, save, stop.

``train.decay_over: time`` does not make the schedule follow the clock. `TimeHorizon` measures
the time of a step at the end of the warm-up and turns the remaining budget into a step count,
the horizon of the (step-driven) decay; it measures again every tenth of the budget, over the
steps since (evaluations and checkpoints included), and moves the horizon when the pace has
changed (another job started or ended on the machine): the decay goes on from where it is to
its floor at the new horizon (`tformer.training.schedule.decay_progress`). The plan is kept in
``TrainState`` so that a resumed run decays as the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import time

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tformer.training.checkpoint import TrainState
from tformer.training.schedule import decay_progress

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
    """``decay_over: time``: the decay's horizon in steps, measured at the end of the warm-up
    (`observe`) and again every tenth of the budget (`replan`).

    The first time per step is measured from the end of the first step this process runs
    (which pays one-off costs: allocation, compilation) to the end of the warm-up (at least the
    second step): during the warm-up the horizon does not matter yet. The steps that the rest of
    the budget is worth at that pace are added to the step count. Each later measurement takes
    the pace since the one before, evaluations and checkpoints included. Process 0's figures are
    sent to every process."""

    REPLANS = 10  # measurements over the budget after the first

    def __init__(self, clock: RunClock, warmup_steps: int, max_minutes: float | None,
                 active: bool) -> None:
        self.clock, self.active = clock, active
        self.budget = 60 * max_minutes if max_minutes is not None else None
        self.warmup_steps = warmup_steps
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
            horizon, now = broadcast_object_list([horizon, now], from_process=0)
        state.schedule_steps = max(horizon, step + 1)
        state.schedule_planned_at = (step, now)
        log.info("decay_over: time: %.3g s per step over steps %d-%d; the %.1f min budget is "
                 "worth %d steps, the horizon of the learning-rate decay (max_minutes still "
                 "stops the run)", per_step, self.first[0] + 1, step, self.budget / 60,
                 state.schedule_steps)

    def replan(self, state: TrainState, accelerator: Accelerator) -> None:
        """Call after optimizer step ``state.step`` at a point every process reaches together
        (a log line): every tenth of the budget, the horizon the pace since the last measurement
        gives, the decay going on from its progress at this step."""
        if not self.active or state.schedule_steps is None:
            return
        plan = self._replanned(state) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            plan = broadcast_object_list([plan], from_process=0)[0]
        if plan is None:
            return
        old = state.schedule_steps
        state.schedule_steps, state.schedule_from, state.schedule_planned_at = plan[:3]
        if plan[3] is not None and abs(state.schedule_steps - old) > 0.01 * old:
            log.info("decay_over: time: %.3g s per step since step %d; the horizon of the "
                     "learning-rate decay moves from step %d to %d", *plan[3:], old,
                     state.schedule_steps)

    def _replanned(self, state: TrainState) -> tuple | None:
        step, now = state.step, self.clock.seconds()
        if state.schedule_planned_at is None:  # a checkpoint from before re-planning: from here
            return state.schedule_steps, state.schedule_from, (step, now), None, None
        last_step, last_seconds = state.schedule_planned_at
        if step <= last_step or now - last_seconds < self.budget / self.REPLANS:
            return None
        # The scheduler has moved already: update step + 1 has its rate. The new line starts
        # there, so that no rate after it is above it.
        at = step + 1
        progress = decay_progress(at, self.warmup_steps, state.schedule_steps,
                                  state.schedule_from)
        if progress >= 1.0 or now >= self.budget:  # at the floor already, or out of time
            return None
        per_step = (now - last_seconds) / (step - last_step)
        horizon = max(step + math.floor((self.budget - now) / per_step + 1e-9), at + 1)
        return horizon, (at, progress), (step, now), per_step, last_step


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
