"""The training progress bar. Its total and its time left follow whichever limit will end the
run: ``train.max_steps``, or the ``train.max_minutes`` budget when the run, at its pace so far,
will spend the budget first (then the total is the estimated number of steps, marked ``~``,
and the time left is what remains of the budget)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tqdm.auto import tqdm

from tformer.training.checkpoint import TrainState


@dataclass(frozen=True)
class ProgressPlan:
    """Where a run is heading, as seen after some step."""

    total: int  # the step the run will end at (estimated when limit is "time_limit")
    seconds_left: float | None  # None: no step timed yet and no time limit
    limit: str  # what will end the run: "max_steps" or "time_limit"


def progress_plan(
    seconds: float,
    step: int,
    max_steps: int,
    max_minutes: float | None,
    start_seconds: float = 0.0,
    start_step: int = 0,
) -> ProgressPlan:
    """The total and time left of a run ``seconds`` into its clock (evaluations included, as
    the clock of ``max_minutes``) after optimizer step ``step``.

    The pace is the mean time per step since (``start_seconds``, ``start_step``): where this
    process started or resumed the run. The loop stops after the first step that ends past the
    budget, so a run on the time limit ends at the step that crosses it.
    """
    done, spent = step - start_step, seconds - start_seconds
    per_step = spent / done if done > 0 and spent > 0 else None
    if max_minutes is None:
        left = None if per_step is None else (max_steps - step) * per_step
        return ProgressPlan(max_steps, left, "max_steps")
    budget_left = max(60 * max_minutes - seconds, 0.0)
    if per_step is None:  # no pace yet: the step limit, and at most the budget
        return ProgressPlan(max_steps, budget_left, "max_steps")
    steps_left = (max_steps - step) * per_step
    if steps_left <= budget_left:
        return ProgressPlan(max_steps, steps_left, "max_steps")
    total = step if budget_left == 0 else step + math.floor(budget_left / per_step) + 1
    return ProgressPlan(min(total, max_steps), budget_left, "time_limit")


class TrainProgress:
    """A tqdm bar driven by `progress_plan` (main process only; silent elsewhere)."""

    _FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{plan_total} "
               "[{elapsed}<{plan_left}, {rate_fmt}{postfix}]")

    def __init__(self, max_steps: int, max_minutes: float | None, state: TrainState,
                 active: bool) -> None:
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.start_step, self.start_seconds = state.step, state.elapsed_seconds
        initial_plan = progress_plan(state.elapsed_seconds, state.step, max_steps, max_minutes,
                                     state.elapsed_seconds, state.step)

        class _Bar(tqdm):
            plan = initial_plan  # tqdm draws the bar before __init__ returns

            @property
            def format_dict(self):  # tqdm's documented way to add fields to bar_format
                fields = super().format_dict
                estimated = "~" if self.plan.limit == "time_limit" else ""
                left = self.plan.seconds_left
                fields["plan_total"] = f"{estimated}{self.plan.total}"
                fields["plan_left"] = "?" if left is None else self.format_interval(left)
                return fields

        self.bar = _Bar(total=initial_plan.total, initial=state.step, disable=not active,
                        desc="train", unit="step", dynamic_ncols=True, bar_format=self._FORMAT)

    def update(self, step: int, seconds: float) -> None:
        """After optimizer step ``step``, ``seconds`` into the run's clock."""
        plan = progress_plan(seconds, step, self.max_steps, self.max_minutes,
                             self.start_seconds, self.start_step)
        self.bar.plan, self.bar.total = plan, plan.total
        self.bar.update(step - self.bar.n)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()
