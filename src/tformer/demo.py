"""``make demo`` / ``tformer demo``: train a small model on the embedded docstring corpus and
show what it learned next to a simple baseline."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from tformer.data import default_cache_dir, docstring_corpus, first_sentence_baseline
from tformer.metrics import rouge
from tformer.recipe import run_recipe
from tformer.training import load_config

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
#: The whole demo's budget, and the part of it that is not the corpus or training: the
#: tokenizer and the encoding (0.3 min on an idle 2-core machine, up to 1.8 under load 3-8),
#: the test split with beam 4 and the report (0.3-0.5), the imports before `run_demo`
#: (0.2-0.3), a margin.
DEMO_MINUTES = 10.0
RESERVED_MINUTES = 2.5

log = logging.getLogger(__name__)


def run_demo(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Train, then print test ROUGE beside the first-sentence baseline and five outputs.

    Training uses as many threads as run fastest now (`fastest_threads`), unless
    ``OMP_NUM_THREADS`` says otherwise.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        threads = fastest_threads()
        torch.set_num_threads(threads)
        log.info("demo: training with %d thread(s) (set OMP_NUM_THREADS to choose)", threads)
    start = time.perf_counter()
    recipe = recipe or (DEMO_RECIPE if DEMO_RECIPE.is_file() else None)
    config = load_config(recipe, list(overrides))
    if config.data.train is None and config.train.max_minutes is not None:
        # The first run parses every installed package (1-3 min, then cached): build the corpus
        # now (train() reuses it) and give training what is left of the demo's budget.
        docstring_corpus(seed=config.train.seed, cache_dir=default_cache_dir())
        spent = (time.perf_counter() - start) / 60
        left = max(DEMO_MINUTES - RESERVED_MINUTES - spent, 1.0)
        if left < config.train.max_minutes:
            log.info("demo: building the corpus took %.1f min; training gets %.1f min so the "
                     "demo ends within %.0f", spent, left, DEMO_MINUTES)
            config = load_config(recipe, [*overrides, f"train.max_minutes={left:.2f}"])
    _set_aside(Path(config.train.output_dir))
    result = run_recipe(config)
    minutes = (time.perf_counter() - start) / 60
    run_dir = result.run_dir
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "test_predictions.jsonl").read_text().splitlines()]
    baseline = rouge([first_sentence_baseline(r["source"]) for r in rows],
                     [r["references"] for r in rows])
    stats = json.loads((run_dir / "data_stats.json").read_text())
    sizes = stats.get("sizes", {})
    if "corpus_sha256" in stats:
        print(f"\ncorpus: {stats['corpus_examples']:,} docstrings of the installed packages "
              f"({', '.join(f'{k} {v:,}' for k, v in sizes.items())}), "
              f"sha256 {stats['corpus_sha256'][:16]}")
    print(f"\ntformer demo: {len(rows)} test docstrings, trained {result.state.step} steps "
          f"({result.stopped_by}); {minutes:.1f} min with the corpus, tokenizer and test")
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    losses = [(r["step"], r["loss"]) for r in records if r["split"] == "validation"]
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
        print(f"    reference : {r['references'][0]}")
        print(f"    tformer   : {r['prediction']}")
    print(f"\nrun directory: {run_dir}  (checkpoint {result.best_checkpoint}, metrics.jsonl, "
          "loss.png)")
    return {"test": metrics, "baseline": baseline, "run_dir": str(run_dir), "minutes": minutes,
            "corpus_examples": stats.get("corpus_examples"),
            "corpus_sha256": stats.get("corpus_sha256")}


def fastest_threads(size: int = 384, seconds: float = 0.3) -> int:
    """1 or all of the machine's threads, whichever multiplies matrices faster right now.

    Measured, not guessed: on an idle 2-core machine the demo trained 1.7x faster with 2
    threads than with one (14,700 against 8,700 tokens/s), but with another job on one core a
    training step with 2 OpenMP threads took 4.3-8.1 s against 0.48-0.66 s with one (each
    thread waits for the slowest). A load average says neither as well as a trial does: each
    setting multiplies ``size`` x ``size`` matrices for about ``seconds``, the faster wins."""
    cores = torch.get_num_threads()
    if cores < 2:
        return 1
    a = torch.randn(size, size)
    rates = {}
    for threads in (1, cores, 1, cores):  # twice each, alternating: a drifting load falls on both
        torch.set_num_threads(threads)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            a @ a
            count += 1
        rates[threads] = rates.get(threads, 0.0) + count / (time.perf_counter() - start)
    torch.set_num_threads(cores)
    log.info("demo: matrix products per second: %s", {k: round(v / 2) for k, v in rates.items()})
    return max(rates, key=rates.get)


def _set_aside(run_dir: Path) -> None:
    """Move an earlier demo's run directory to ``<run_dir>.previous`` (replacing an older one):
    `train` refuses a fresh run into a used directory (`tformer.training.rundir`), and a second
    `make demo` should start afresh while keeping the last run to compare with."""
    if run_dir.exists():
        previous = run_dir.with_name(f"{run_dir.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        run_dir.rename(previous)
        log.info("demo: moved the earlier run directory to %s", previous)
