"""The continuous batcher's costs in-process, without HTTP: one decoder step for 1, 4 and 16
running rows (greedy; and 16 sampled rows, each with its own generator, as OpenAI's defaults
ask, temperature 1, and with top-p 0.9), and admitting one newcomer into 15 running rows
(tokenize, encode, join).

    .venv/bin/python bench/serve_step.py CHECKPOINT [--threads 1]

``--parts`` also times the 1- and 16-row steps with the output projection, then the attention
kernel (``attention_fast``: softmax(QKᵀ/√d)·V; not the projections around it), replaced by a
stand-in that costs nothing (zeros; the queries), in turns with the whole step,
and prints the difference: what each part costs in the step as it runs (its weights read from
memory rather than from a warm cache, as in a loop over the part alone).

End-of-sequence is switched off so that every row keeps decoding; each figure is the best of
``--repeats`` runs of ``--steps`` steps, taken after 10 warm-up steps. The ratio of a 16-row
step to a 1-row step is the floor under the serving benchmark's p99 ratio
(`bench/serve_load.py`): under 16 closed-loop clients a request's latency is its steps at the
cost of a batch step, plus the admissions that come between them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import tformer  # noqa: E402
from tformer.serving.batching import Job  # noqa: E402
from tformer.serving.continuous import ContinuousBatcher, Decoding  # noqa: E402

# The Multi30k validation split of the local mirror (tformer data): $TFORMER_DATA_DIR/multi30k/.
DEFAULT_INPUTS = Path(os.environ.get("TFORMER_DATA_DIR", "data")) / "multi30k" / "val.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS)
    parser.add_argument("--random-init", metavar="SIZE", default=None,
                        help="time a freshly initialised model of this size (e.g. base) with "
                        "the checkpoint's tokenizer, as bench/serve_load.py does")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", action="store_true",
                        help="also time the step without the output projection, then without "
                        "attention: what each costs (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if args.random_init:
        sys.path.insert(0, str(ROOT / "bench"))
        from serve_load import random_checkpoint

        scratch = tempfile.TemporaryDirectory()  # removed when the script ends
        checkpoint = random_checkpoint(checkpoint, args.random_init, Path(scratch.name) / "random")
    seq2seq = tformer.load(checkpoint)
    texts = [json.loads(line)["source"] for line in
             args.inputs.read_text(encoding="utf-8").splitlines()[:32]]
    batcher = ContinuousBatcher(seq2seq, max_batch_size=16, max_wait_ms=0, max_queue=64)
    batcher.eos_ids = set()
    loop = asyncio.new_event_loop()

    def requests(n: int, first: int = 0, top_p: float | None = None) -> list[Decoding]:
        options = {"max_new_tokens": 10**6}
        if top_p is not None:
            options.update(do_sample=True, temperature=1.0, top_k=0, top_p=top_p, seed=0)
        return [Decoding(Job([texts[first + i]], options, loop.create_future(), loop),
                         time.monotonic(), [None], 1) for i in range(n)]

    def step_ms(n: int, top_p: float | None = None) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            rows = batcher._admit(None, requests(n, top_p=top_p))
            with torch.inference_mode():
                for _ in range(10):
                    rows = batcher._step(rows)
                started = time.perf_counter()
                for _ in range(args.steps):
                    rows = batcher._step(rows)
                best = min(best, (time.perf_counter() - started) / args.steps)
            batcher._cache.keep([])
        return best * 1000

    def admit_ms() -> float:
        best = float("inf")
        for _ in range(args.repeats * 3):
            rows = batcher._admit(None, requests(15))
            started = time.perf_counter()
            batcher._admit(rows, requests(1, 16))
            best = min(best, time.perf_counter() - started)
            batcher._cache.keep([])
        return best * 1000

    try:
        steps = {n: step_ms(n) for n in (1, 4, 16)}
        sampling = {top_p: step_ms(16, top_p=top_p) for top_p in (1.0, 0.9)}
        admit = admit_ms()
        parts = {name: part_ms(step_ms, replace) for name, replace in
                 stand_ins(seq2seq).items()} if args.parts else {}
    finally:
        batcher.stop()
        loop.close()
    print(f"checkpoint {checkpoint}; {args.threads} thread(s); torch {torch.__version__}")
    print("decoder step, ms: " + ", ".join(f"{n} rows {ms:.2f}" for n, ms in steps.items()))
    print("16 rows sampled, ms: " + ", ".join(
        f"top-p {top_p:g} {ms:.2f} ({ms / steps[16] - 1:+.0%} over greedy)"
        for top_p, ms in sampling.items()))
    print(f"16 rows / 1 row: {steps[16] / steps[1]:.2f}x; admitting 1 newcomer into 15 rows: "
          f"{admit:.2f} ms ({admit / steps[1]:.2f} single-row steps)")
    for name, ms in parts.items():
        print(f"{name} in the step, ms: " + ", ".join(
            f"{n} row{'s' * (n > 1)} {whole - rest:.2f} (of {whole:.2f})"
            for n, (whole, rest) in ms.items()))


def part_ms(step_ms, replace, rounds: int = 4) -> dict[int, tuple[float, float]]:
    """For 1 and 16 rows: the best step time with the part and without it (``replace()``
    swaps a stand-in in and returns what puts the part back), taken in turns over ``rounds``
    so that a change in the machine's load falls on both."""
    best = {n: [float("inf"), float("inf")] for n in (1, 16)}
    for _ in range(rounds):
        for n in best:
            best[n][0] = min(best[n][0], step_ms(n))
            restore = replace()
            try:
                best[n][1] = min(best[n][1], step_ms(n))
            finally:
                restore()
    return {n: (whole, rest) for n, (whole, rest) in best.items()}


def stand_ins(seq2seq) -> dict:
    """Per part of the model, a function that replaces it by a stand-in that costs nothing
    (zeros of the logits' shape; the queries as the attention's output) and returns what puts
    it back."""
    from tformer.model import attention

    core = seq2seq.model.model
    vocab = seq2seq.model.config.vocab_size

    def projection():
        core.project = lambda hidden: hidden.new_zeros(*hidden.shape[:-1], vocab)
        return lambda: delattr(core, "project")  # the class's method again

    def attention_kernel():
        fast = attention.attention_fast
        attention.attention_fast = lambda q, k, v, *args, **kwargs: q
        return lambda: setattr(attention, "attention_fast", fast)

    return {"output projection": projection, "attention kernel": attention_kernel}

if __name__ == "__main__":
    main()
