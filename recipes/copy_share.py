"""How much a model with copy attention copies: P(copy) = 1 − p_gen at each token of its own
outputs, read teacher-forced with `tformer.visualization.attention_maps_batch`.

    .venv/bin/python recipes/copy_share.py CHECKPOINT PREDICTIONS.jsonl [--first 100]

PREDICTIONS is the ``predictions.jsonl`` that ``tformer evaluate`` writes (fields ``source``
and ``prediction``). The end-of-sequence position is left out. Prints the number of tokens,
the mean P(copy) and the share of tokens whose P(copy) is above 0.5.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import tformer
from tformer.visualization.attention import attention_maps_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("predictions")
    parser.add_argument("--first", type=int, default=100, help="outputs to read")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--max-source-length", type=int, default=None)
    args = parser.parse_args()
    model = tformer.load(args.checkpoint)
    if getattr(getattr(model.model, "model", None), "copy", None) is None:
        parser.error(f"{args.checkpoint}: this model has no copy attention")
    with open(args.predictions, encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.first))]
    p_copy = []
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i: i + args.batch_size]
        maps = attention_maps_batch(model, [r["source"] for r in batch],
                                    [r["prediction"] for r in batch],
                                    max_source_length=args.max_source_length)
        p_copy += [1.0 - m.p_gen[:-1] for m in maps]  # without the </s> position
    p = np.concatenate(p_copy)
    print(f"{len(rows)} outputs, {p.size} tokens: mean P(copy) {p.mean():.3f}; "
          f"share with P(copy) > 0.5: {(p > 0.5).mean():.3f}")


if __name__ == "__main__":
    main()
