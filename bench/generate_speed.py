"""Generation speed: tformer's PyTorch path, Hugging Face ``generate()``, and CTranslate2
float32 and int8 exports of the same checkpoint, in one run; then BLEU of int8 against float32.

    .venv/bin/python bench/generate_speed.py runs/multi30k/checkpoints/step-0004000
    .venv/bin/python bench/generate_speed.py CHECKPOINT --quick       # smoke run, < 1 min
    .venv/bin/python bench/generate_speed.py CHECKPOINT --threads 1   # default: 2

**Paths** (all on the same weights, the CPU, ``--threads`` threads each):

- ``HF generate``: the peer. ``AutoModelForSeq2SeqLM`` weights (here tformer's own model through
  its Hugging Face adapter), used as a Hugging Face user would: batches in input order,
  ``tokenizer(batch, padding=True)``, ``model.generate(...)``, ``batch_decode``.
- ``tformer torch``: ``tformer.load(checkpoint).generate(texts)``. It calls the same
  ``model.generate`` (tformer has no second beam search); the only difference is that it sorts
  the inputs by length before batching (less padding at batch 32; none at batch 1, where the two
  paths do the same work and their ratio measures noise).
- ``CT2 float32`` / ``CT2 int8``: ``tformer export --quantization float32 | int8``, loaded
  with ``tformer.load(export, intra_threads=threads)``; same tokenizer, same sorting, and
  CTranslate2's own decoder and beam search (``inter_threads=1``).

**Settings kept equal**: ``max_new_tokens`` (default 64), greedy or beam 4 with
``early_stopping=True`` (the beam search CTranslate2 does, so every path searches the same way;
float32 outputs are then identical across paths), length penalty 1, the same source sentences
(Multi30k test2016, first ``--examples``), ``torch.set_num_threads`` = CTranslate2's
``intra_threads`` = ``--threads``.

**One process per path.** Each path runs in its own worker process, and only one computes at a
time. In one process, torch's and CTranslate2's thread pools fight for the cores: measured on
this 2-core machine with 2 threads each, CTranslate2 float32 greedy at batch 1 fell from 1,330 to
140 tokens/s once torch had generated in the same process (1 thread each: no effect).

**Tokens per second** = output tokens (each path's own outputs, re-tokenized without special
tokens) / wall time of ``generate`` over all the sentences, tokenization and decoding included.
The machine may be shared, so each configuration runs ``--rounds`` rounds, each timing every path
once in rotating order; the figure is the median over rounds and the ratio the median of the
per-round ratios to HF generate.

**BLEU** of the int8 export against the float32 export (greedy and beam 4, batch 32) on the first
``--bleu-examples`` sentences of test2016: sacreBLEU's default BLEU and the lowercased Moses-
tokenised BLEU used for published Multi30k figures (``tformer.metrics.moses_bleu``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from worker_pool import WorkerPool, rotations

import tformer
from tformer import ct2
from tformer.metrics import all_metrics

# The Multi30k test split of the local mirror (tformer data): $TFORMER_DATA_DIR/multi30k/.
DATA = Path(os.environ.get("TFORMER_DATA_DIR", "data")) / "multi30k" / "test2016.jsonl"
PATHS = ("HF generate", "tformer torch", "CT2 float32", "CT2 int8")


def hf_generate(model, tokenizer, texts: list[str], batch_size: int, **options) -> list[str]:
    """The peer: what a Hugging Face user writes, batches in input order."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
            ids = model.generate(**enc, **options)
            outputs += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return outputs


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def worker(conn, name: str, model_dir: str, threads: int) -> None:
    """One path in its own process: load, then answer (texts, batch_size, options) requests
    with (seconds, outputs, output tokens) until sent None."""
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    if name.startswith("CT2"):
        seq2seq = tformer.load(model_dir, device="cpu", intra_threads=threads)
    else:
        seq2seq = tformer.load(model_dir, device="cpu")
    conn.send("ready")
    while (request := conn.recv()) is not None:
        texts, batch_size, options = request
        start = time.perf_counter()
        if name == "HF generate":
            out = hf_generate(seq2seq.model, seq2seq.tokenizer, texts, batch_size, **options)
        else:
            out = seq2seq.generate(texts, batch_size=batch_size, **options)
        seconds = time.perf_counter() - start
        conn.send((seconds, out, count_tokens(seq2seq.tokenizer, out)))


def speed(workers: WorkerPool, texts: list[str], batch_size: int, options: dict,
          rounds: int) -> dict[str, dict]:
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    tokens: dict[str, int] = {}
    outputs: dict[str, list[str]] = {}
    for _, name in rotations(PATHS, rounds):
        seconds, outputs[name], tokens[name] = workers.run(name, (texts, batch_size, options))
        times[name].append(seconds)
    result = {}
    for name in PATHS:
        rates = [tokens[name] / t for t in times[name]]
        ratios = [(tokens[name] / t) / (tokens["HF generate"] / h)
                  for t, h in zip(times[name], times["HF generate"])]
        same = sum(a == b for a, b in zip(outputs[name], outputs["HF generate"]))
        result[name] = {"tokens_per_s": statistics.median(rates),
                        "ratio": statistics.median(ratios), "same_as_hf": same,
                        "tokens": tokens[name]}
    return result


def bleu(workers: WorkerPool, sources: list[str], references: list[list[str]],
         options: dict) -> dict[str, dict]:
    scores = {}
    for name in ("CT2 float32", "CT2 int8"):
        _, predictions, _ = workers.run(name, (sources, 32, options))
        m = all_metrics(predictions, references, "auto", "de")
        scores[name] = {"bleu": m["bleu"], "bleu_moses_lc": m["bleu_moses_lc"]}
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of the Multi30k recipe (own model)")
    parser.add_argument("--data", type=Path, default=DATA, help="JSONL with source and target")
    parser.add_argument("--threads", type=int, default=2, help="torch = CTranslate2 threads")
    parser.add_argument("--examples", type=int, default=None,
                        help="sentences per timed pass (default: 64 at batch 1, 256 at batch 32)")
    parser.add_argument("--bleu-examples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per path")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true",
                        help="16 sentences, 1 round, 64 for BLEU: a smoke run")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.rounds, args.bleu_examples = 16, 1, 64

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # "forgot to detokenize?" per call
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    records = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    sources = [r["source"] for r in records]

    with tempfile.TemporaryDirectory(prefix="generate-speed-") as tmp:
        model_dirs = {"HF generate": args.checkpoint, "tformer torch": args.checkpoint}
        for name, quantization in (("CT2 float32", "float32"), ("CT2 int8", "int8")):
            out = ct2.export(args.checkpoint, Path(tmp) / quantization, quantization=quantization)
            model_dirs[name] = str(out)
        workers = WorkerPool(worker, model_dirs, args.threads)

        print(f"checkpoint {args.checkpoint}; {args.threads} threads; torch "
              f"{torch.__version__}; ctranslate2 {ct2.require_ctranslate2().__version__}; "
              f"max_new_tokens {args.max_new_tokens}; {args.rounds} rounds")
        header = (f"{'decoding':8} {'batch':>5} {'path':14} {'tokens/s':>9} "
                  f"{'vs HF generate':>14} {'same as HF':>10}")
        print(header)
        print("-" * len(header))
        figures: dict = {"speed": {}, "bleu": {}}
        for decoding, options in (("greedy", {}), ("beam 4", dict(num_beams=4,
                                                                  early_stopping=True))):
            options = dict(options, max_new_tokens=args.max_new_tokens)
            for batch_size in (1, 32):
                n = args.examples or (64 if batch_size == 1 else 256)
                result = speed(workers, sources[:n], batch_size, options, args.rounds)
                figures["speed"][f"{decoding}, batch {batch_size}"] = result
                for name, r in result.items():
                    print(f"{decoding:8} {batch_size:>5} {name:14} {r['tokens_per_s']:>9.0f} "
                          f"{r['ratio']:>13.2f}x {r['same_as_hf']:>6}/{n}")

        refs = [[r["target"]] if isinstance(r["target"], str) else r["target"] for r in records]
        n = min(args.bleu_examples, len(sources))
        print(f"\nBLEU on {args.data.name}[:{n}], batch 32 (sacreBLEU 13a / Moses-lc):")
        for decoding, options in (("greedy", {}), ("beam 4", dict(num_beams=4,
                                                                  early_stopping=True))):
            scores = bleu(workers, sources[:n], refs[:n],
                          dict(options, max_new_tokens=args.max_new_tokens))
            figures["bleu"][decoding] = scores
            f32, q = scores["CT2 float32"], scores["CT2 int8"]
            print(f"  {decoding:7} float32 {f32['bleu']:.2f} / {f32['bleu_moses_lc']:.2f}   "
                  f"int8 {q['bleu']:.2f} / {q['bleu_moses_lc']:.2f}   "
                  f"int8 - float32 {q['bleu'] - f32['bleu']:+.2f} / "
                  f"{q['bleu_moses_lc'] - f32['bleu_moses_lc']:+.2f}")
        workers.close()

    goal = [figures["speed"][f"{d}, batch 32"]["CT2 int8"]["ratio"] for d in ("greedy", "beam 4")]
    print(f"\ngoal: CT2 int8 >= 3x HF generate at batch 32: greedy {goal[0]:.2f}x, "
          f"beam 4 {goal[1]:.2f}x")
    if args.output is not None:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
