"""The lead baseline of a summarization set: the first N lines (dialogue turns) or sentences
of each source, scored like a model with ``tformer evaluate``'s metrics.

    .venv/bin/python recipes/lead_baseline.py $TFORMER_DATA_DIR/dialogsum/test.jsonl --lines 1 2 3

Speaker tags (``#Person1#:``) are kept: DialogSum's summaries name speakers the same way.
"""

from __future__ import annotations

import argparse
import json
import re

from tformer.data import load_eval_examples
from tformer.metrics import all_metrics


def lead(source: str, n: int, unit: str) -> str:
    """The first ``n`` non-empty lines (``unit="lines"``) or sentences of ``source``."""
    if unit == "lines":
        return " ".join([x.strip() for x in source.splitlines() if x.strip()][:n])
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(source.split()))
    return " ".join(sentences[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="JSONL/CSV/TSV/Parquet with source and target")
    parser.add_argument("--lines", type=int, nargs="+", default=[1, 2, 3], help="values of N")
    parser.add_argument("--unit", choices=["lines", "sentences"], default="lines")
    parser.add_argument("--output", default=None, help="write all results as JSON here")
    args = parser.parse_args()
    examples = load_eval_examples(args.data)
    results = {}
    for n in args.lines:
        predictions = [lead(s, n, args.unit) for s in examples.sources]
        metrics = all_metrics(predictions, examples.references)
        results[f"lead-{n}"] = metrics
        print(f"lead-{n} {args.unit}: " + "  ".join(
            f"{k} {metrics[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
