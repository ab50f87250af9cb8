"""``make demo`` / ``tformer demo``: train a small model on the embedded docstring corpus and
show what it learned next to a simple baseline."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tformer.data import first_sentence_baseline
from tformer.metrics import rouge
from tformer.training import load_config, train

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"

log = logging.getLogger(__name__)


def run_demo(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Train, then print test ROUGE beside the first-sentence baseline and five outputs.

    Training uses one thread unless ``OMP_NUM_THREADS`` says otherwise: on the shared 2-core
    machine, with other jobs on the cores, a training step with 2 OpenMP threads took 4.3-8.1 s
    and with one thread 0.48-0.66 s (the demo's model, 4,800-token batches, load average ~5).
    """
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
        log.info("demo: training with 1 thread (set OMP_NUM_THREADS to choose)")
    recipe = recipe or (DEMO_RECIPE if DEMO_RECIPE.is_file() else None)
    config = load_config(recipe, list(overrides))
    start = time.perf_counter()
    result = train(config)
    minutes = (time.perf_counter() - start) / 60
    run_dir = result.run_dir
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "test_predictions.jsonl").read_text().splitlines()]
    baseline = rouge([first_sentence_baseline(r["source"]) for r in rows],
                     [r["reference"] for r in rows])
    stats = json.loads((run_dir / "data_stats.json").read_text())
    sizes = stats.get("sizes", {})
    if "corpus_sha256" in stats:
        print(f"\ncorpus: {stats['corpus_examples']:,} docstrings of the installed packages "
              f"({', '.join(f'{k} {v:,}' for k, v in sizes.items())}), "
              f"sha256 {stats['corpus_sha256'][:16]}")
    print(f"\ntformer demo: {len(rows)} test docstrings, trained {result.state.step} steps "
          f"in {minutes:.1f} min")
    losses: list[tuple[int, float]] = []
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if record["split"] == "validation":
            if losses and record["step"] < losses[-1][0]:  # an earlier run in the same directory
                losses = []
            losses.append((record["step"], record["loss"]))
    if losses:
        print("validation loss: " + ", ".join(f"{loss:.2f} (step {step})"
                                              for step, loss in losses))
    print(f"{'':28}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}")
    for name, m in (("tformer (best checkpoint)", metrics),
                    ("baseline: first sentence", baseline)):
        print(f"{name:28}{m['rouge1']:9.2f}{m['rouge2']:9.2f}{m['rougeL']:9.2f}")
    print("\nFive test examples:")
    for r in rows[:5]:
        signature = r["source"].split("\n", 1)[0]
        print(f"\n  {signature[:90]}")
        print(f"    reference : {r['reference']}")
        print(f"    tformer   : {r['prediction']}")
    print(f"\nrun directory: {run_dir}  (checkpoint {result.best_checkpoint}, metrics.jsonl, "
          "loss.png)")
    return {"test": metrics, "baseline": baseline, "run_dir": str(run_dir), "minutes": minutes,
            "corpus_examples": stats.get("corpus_examples"),
            "corpus_sha256": stats.get("corpus_sha256")}
