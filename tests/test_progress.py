"""The training progress bar's plan: its total and time left follow whichever limit ends the
run (pure arithmetic on the run's clock, no wall clock read)."""

import pytest

from tformer.training.checkpoint import TrainState
from tformer.training.progress import ProgressPlan, TrainProgress, progress_plan


def test_steps_limit_without_a_time_budget():
    assert progress_plan(0.0, 0, 1000, None) == ProgressPlan(1000, None, "max_steps")
    plan = progress_plan(50.0, 100, 1000, None)  # 0.5 s per step
    assert plan == ProgressPlan(1000, pytest.approx(450.0), "max_steps")


def test_time_budget_that_ends_the_run_first():
    # 8.5 min budget, 1 s per step: 3,000 steps would take 50 min; the budget ends the run
    plan = progress_plan(120.0, 120, 3000, 8.5)
    assert plan.limit == "time_limit"
    assert plan.seconds_left == pytest.approx(8.5 * 60 - 120)
    assert plan.total == 120 + 390 + 1  # the step that crosses the budget is the last
    # the estimate follows the pace: slower steps, fewer of them
    slower = progress_plan(240.0, 120, 3000, 8.5)
    assert slower.total == 120 + 135 + 1 and slower.seconds_left == pytest.approx(270.0)


def test_steps_end_the_run_before_the_budget():
    plan = progress_plan(10.0, 100, 200, 8.5)  # 0.1 s per step: 10 s left of 500 s
    assert plan == ProgressPlan(200, pytest.approx(10.0), "max_steps")


def test_budget_spent_and_no_pace_yet():
    spent = progress_plan(31.0, 30, 3000, 0.5)
    assert spent == ProgressPlan(30, 0.0, "time_limit")  # this step is the run's last
    assert progress_plan(0.0, 0, 3000, 8.5) == ProgressPlan(3000, 510.0, "max_steps")


def test_resumed_run_paces_from_where_it_resumed():
    # resumed at step 500 after 300 s; 100 steps in the next 20 s: 0.2 s per step
    plan = progress_plan(320.0, 600, 10_000, 10.0, start_seconds=300.0, start_step=500)
    assert plan == ProgressPlan(600 + 1400 + 1, pytest.approx(280.0), "time_limit")
    assert progress_plan(300.0, 500, 10_000, 10.0, 300.0, 500).total == 10_000  # no pace yet


def test_bar_shows_the_plan():
    state = TrainState()
    progress = TrainProgress(3000, 8.5, state, active=True)
    progress.update(120, 120.0)
    text = str(progress.bar)
    assert "120/~511" in text and "06:30" in text  # 390 s left of the budget
    progress.close()
