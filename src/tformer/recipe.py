"""A recipe, run whole: what ``tformer train`` and ``tformer demo`` do.

1. `tformer.training.train`: the run directory, checkpoints, ``metrics.jsonl``,
   ``summary.json``;
2. `tformer.training.finish.finish_run`: LoRA merge, test score;
3. ``loss.png`` and ``report.html`` (`tformer.visualization`), read back from the run
   directory. A report that fails is a warning: the run is on disk already.
"""

from __future__ import annotations

import logging

from tformer.training import Config, TrainResult, train
from tformer.training.finish import finish_run
from tformer.visualization import report
from tformer.visualization.plots import plot_losses

log = logging.getLogger(__name__)


def run_recipe(config: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train (see `tformer.training.train` for ``resume`` / ``overwrite``), then the after-run
    work, on the main process."""
    result = train(config, resume=resume, overwrite=overwrite)
    if not result.main_process:
        return result
    finish_run(result, config)
    run_dir = result.run_dir
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    try:
        report.write_report(run_dir, device=result.device)
    except Exception as error:  # noqa: BLE001 (its checkpoints and metrics are on disk already)
        log.warning("could not write the report of %s: %s: %s", run_dir, type(error).__name__,
                    error)
    return result
