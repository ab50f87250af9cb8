"""Multi30k as the published tokenised-BLEU setups see it: every sentence lowercased,
Moses-normalised and Moses-tokenised (source English, target German), written as JSONL beside
the run so ``recipes/multi30k_moses.yaml`` can train on it.

    .venv/bin/python recipes/multi30k_moses_prepare.py            # -> runs/data/multi30k_moses/

The published 41.02 BLEU (fairseq transformer_tiny) is measured on text prepared this way, and
models for it are trained on text prepared this way too. The German side is a fixed point of the
preparation on val and test2016 (checked when this was written), so ``tformer evaluate
--moses de`` on the prepared test file gives the same measure as on the original references.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tformer.metrics import moses_lowercase

SPLITS = ("train", "val", "test2016")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/multi30k", help="the original JSONL")
    parser.add_argument("--out", default="runs/data/multi30k_moses", help="where to write")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        path = Path(args.data) / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        sources = moses_lowercase([r["source"] for r in rows], "en")
        targets = moses_lowercase([r["target"] for r in rows], "de")
        tmp = out / f"{split}.jsonl.tmp"  # written whole, then renamed: no half file on a crash
        with tmp.open("w", encoding="utf-8") as f:
            for row, source, target in zip(rows, sources, targets):
                f.write(json.dumps({**row, "source": source, "target": target},
                                   ensure_ascii=False) + "\n")
        tmp.replace(out / f"{split}.jsonl")
        print(f"{path} -> {out / f'{split}.jsonl'}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
