"""``make demo`` / ``tformer demo``: train a small model on the embedded docstring corpus and
show what it learned next to a simple baseline."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tformer.data import first_sentence_baseline
from tformer.metrics import rouge
from tformer.recipe import run_recipe
from tformer.training import load_config

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"


def run_demo(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Train, then print test ROUGE beside the first-sentence baseline and five outputs."""
    recipe = recipe or (DEMO_RECIPE if DEMO_RECIPE.is_file() else None)
    config = load_config(recipe, list(overrides))
    start = time.perf_counter()
    # the demo owns its output_dir: a second demo replaces the first one's checkpoints,
    # tokenizer and metrics (the run directory's lock still stops two demos at once)
    result = run_recipe(config, overwrite=True)
    minutes = (time.perf_counter() - start) / 60
    run_dir = result.run_dir
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "test_predictions.jsonl").read_text().splitlines()]
    baseline = rouge([first_sentence_baseline(r["source"]) for r in rows],
                     [r["references"] for r in rows])
    print(f"\ntformer demo: {len(rows)} test docstrings, trained {result.state.step} steps "
          f"in {minutes:.1f} min")
    print(f"{'':28}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}")
    for name, m in (("tformer (best checkpoint)", metrics),
                    ("baseline: first sentence", baseline)):
        print(f"{name:28}{m['rouge1']:9.2f}{m['rouge2']:9.2f}{m['rougeL']:9.2f}")
    print("\nFive test examples:")
    for r in rows[:5]:
        signature = r["source"].split("\n", 1)[0]
        print(f"\n  {signature[:90]}")
        print(f"    reference : {r['references'][0]}")
        print(f"    tformer   : {r['prediction']}")
    print(f"\nrun directory: {run_dir}  (checkpoint {result.best_checkpoint}, metrics.jsonl, "
          "loss.png)")
    return {"test": metrics, "baseline": baseline, "run_dir": str(run_dir), "minutes": minutes}
