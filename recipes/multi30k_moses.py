"""Multi30k as the published tokenised-BLEU setups see it: every sentence lowercased,
Moses-normalised and Moses-tokenised (source English, target German).

    .venv/bin/python recipes/multi30k_moses.py prepare     # -> runs/data/multi30k_moses/*.jsonl
    .venv/bin/python recipes/multi30k_moses.py score EVAL_DIR runs/data/multi30k_moses/test2016.jsonl
    .venv/bin/python recipes/multi30k_moses.py report runs/multi30k_moses   # the whole protocol

``prepare`` reads Multi30k as every recipe does (the ``multi30k`` folder of the mirror
``$TFORMER_DATA_DIR``, else ``bentrevett/multi30k`` on the Hub) and writes the data
``recipes/multi30k_moses.yaml`` trains on; each record keeps its original, cased target as
``reference``. ``score`` reads the predictions of ``tformer evaluate --output-dir EVAL_DIR``
(lowercased, tokenised), detokenises them (sacremoses) and scores them with sacreBLEU against
those original references, case-insensitively: the nearest a lowercasing model gets to cased
detokenised sacreBLEU.
``report RUN_DIR`` runs the published protocol on a finished run with the ``tformer`` commands
of docs/results.md: ``tformer average --last 5``, then for that average and for the last
checkpoint ``tformer evaluate`` (beam 5, ``--moses de``) on test2016 and val, then ``score``;
it prints one table (about a minute for the recipe's model on two CPU cores).

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

#: The prepared files, by role: the names of the original Multi30k files.
SPLITS = {"train": "train", "validation": "val", "test": "test2016"}


def prepare(args: argparse.Namespace) -> None:
    from tformer.data import load_examples
    from tformer.data.sources import locate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for role, where in locate("multi30k").items():
        rows, _ = load_examples(where.path_or_name, split=where.split,
                                source_column=where.source_column,
                                target_column=where.target_column)
        sources = moses_lowercase(rows["source"], "en")
        targets = moses_lowercase(rows["target"], "de")
        name = SPLITS[role]
        tmp = out / f"{name}.jsonl.tmp"  # written whole, then renamed: no half file on a crash
        with tmp.open("w", encoding="utf-8") as f:
            for i, (original, source, target) in enumerate(zip(rows["target"], sources, targets)):
                f.write(json.dumps({"id": f"{name}-{i}", "source": source, "target": target,
                                    "reference": original}, ensure_ascii=False) + "\n")
        tmp.replace(out / f"{name}.jsonl")
        print(f"{where.path_or_name} -> {out / f'{name}.jsonl'}: {len(rows)} pairs")


def score(args: argparse.Namespace) -> None:
    import sacrebleu
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang="de")
    predicted = [json.loads(line) for line in
                 (Path(args.eval_dir) / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    # prepare's files keep the cased original as "reference"; any other file: its "target"
    original = {r["id"]: r.get("reference", r["target"]) for r in map(
        json.loads, Path(args.references).read_text(encoding="utf-8").splitlines())}
    missing = [p["id"] for p in predicted if p["id"] not in original]
    if missing:
        raise SystemExit(f"{args.references}: no reference for ids {missing[:5]}")
    hyps = [detok.detokenize(p["prediction"].split()) for p in predicted]
    refs = [original[p["id"]] for p in predicted]
    bleu = sacrebleu.metrics.BLEU(lowercase=True)
    result = bleu.corpus_score(hyps, [refs])
    chrf = sacrebleu.metrics.CHRF(lowercase=True).corpus_score(hyps, [refs])
    scores = {"detok_bleu_lc": result.score, "detok_bleu_lc_signature": str(bleu.get_signature()),
              "detok_chrf_lc": chrf.score}
    (Path(args.eval_dir) / "detok_metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
    metrics = json.loads((Path(args.eval_dir) / "metrics.json").read_text())
    print(f"{args.eval_dir}: BLEU (Moses, lc) {metrics['bleu_moses_lc']:.2f}; detokenised, "
          f"case-insensitive sacreBLEU {result.score:.2f}, chrF {chrf.score:.2f} "
          f"({bleu.get_signature()})")


def report(args: argparse.Namespace) -> None:
    from tformer.cli import main as tformer_cli
    from tformer.training.average import last_checkpoints
    from tformer.training.checkpoint import CheckpointError

    def tformer(*argv: str) -> None:  # the documented commands, in this process
        if tformer_cli(list(argv)):
            raise SystemExit(f"report: tformer {' '.join(argv)} failed")

    run = Path(args.run_dir)
    try:
        last = last_checkpoints(run, 1)[0]  # RUN_DIR/checkpoints/step-*
    except CheckpointError as e:
        raise SystemExit(f"report: {e}") from None
    average = run / f"avg{args.last}"
    tformer("average", str(run), "--last", str(args.last), "-o", str(average))
    rows = []
    for model in (average, last):
        for split in ("test2016", "val"):
            out = run / f"eval-{split}-{model.name}"
            tformer("evaluate", str(model), "--data", str(Path(args.prepared) / f"{split}.jsonl"),
                    "--num-beams", "5", "--max-new-tokens", "64", "--moses", "de",
                    "--output-dir", str(out))
            score(argparse.Namespace(eval_dir=out,
                                     references=Path(args.prepared) / f"{split}.jsonl"))
            m = json.loads((out / "metrics.json").read_text())
            d = json.loads((out / "detok_metrics.json").read_text())
            rows.append((model.name, split, m["bleu_moses_lc"], d["detok_bleu_lc"],
                         d["detok_chrf_lc"]))
    print("\n| model | split | BLEU (Moses, lc) | detok. sacreBLEU (lc) | chrF (lc) |")
    print("|---|---|---:|---:|---:|")
    for name, split, bleu, detok, chrf in rows:
        print(f"| {name} | {split} | {bleu:.2f} | {detok:.2f} | {chrf:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("prepare", help="write the prepared JSONL (reads $TFORMER_DATA_DIR/"
                         "multi30k, else the Hub)")
    p.add_argument("--out", default="runs/data/multi30k_moses", help="where to write")
    p.set_defaults(func=prepare)
    p = verbs.add_parser("score", help="detokenised, case-insensitive sacreBLEU of an evaluation")
    p.add_argument("eval_dir", help="an output directory of tformer evaluate")
    p.add_argument("references", help="prepare's JSONL of the same split (or any JSONL with "
                   "the same ids and the original targets)")
    p.set_defaults(func=score)
    p = verbs.add_parser("report", help="average the last checkpoints, evaluate and score them")
    p.add_argument("run_dir", help="a finished run of recipes/multi30k_moses.yaml")
    p.add_argument("--last", type=int, default=5,
                   help="checkpoints to average; the recipe's last 5 (500 steps apart, the "
                        "last where time ran out) spanned 6.4 and 7.9 epochs in its two runs; "
                        "the published figure averages 10 epoch checkpoints, 9 epochs apart")
    p.add_argument("--prepared", default="runs/data/multi30k_moses", help="prepare's --out")
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
