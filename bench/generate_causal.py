"""Decoder-only generation speed: tformer against Hugging Face ``generate()`` on
``GPT2LMHeadModel`` with the same weights, sampling at batch 1 and 16, in one run.

    .venv/bin/python bench/generate_causal.py                 # both shapes, 3 rounds
    .venv/bin/python bench/generate_causal.py --quick         # fewer prompts, 3 rounds: 2-3 min
    .venv/bin/python bench/generate_causal.py --quick --rounds 7  # the figures of benchmarks.md
    .venv/bin/python bench/generate_causal.py --shapes small  # nanoGPT's CPU shape only

**Model.** A random ``gpt2``-preset ``TformerForCausalLM`` over a character vocabulary of 65
tokens (4 special, 61 characters). ``small`` is nanoGPT's CPU setting for shakespeare_char
(4 layers, 4 heads, D 128, context 64); ``medium`` its GPU one (6 layers, 6 heads, D 384, context
256). ``tformer.convert.to_transformers`` gives the ``GPT2LMHeadModel`` with the same weights
(logits equal to 1e-5, tests/test_convert.py), ``tformer export`` the CTranslate2 float32 and
int8 models.

**Paths**, each continuing the same prompts through the same wrapper,
``tformer.generation.continue_prompts`` (tokenize, batch with left padding, generate, decode the
new tokens), so that only the model and its decoding loop differ:

- ``HF GPT-2``: the peer, ``GPT2LMHeadModel.generate()`` (``tformer.generation.continue_texts``
  over it: what a Hugging Face user writes, ``generate(input_ids, attention_mask, ...)``);
- ``tformer``: ``tformer.load(checkpoint).generate``: ``TformerForCausalLM.generate()``, the
  same Hugging Face decoding loop over tformer's model and cache view;
- ``CT2 float32`` / ``CT2 int8``: ``tformer.load(export).generate``, CTranslate2's ``Generator``.

**Settings kept equal**: the prompts (4 to 16 characters of an English text), ``max_new_tokens``
(48), sampling with temperature 0.8 and no top-k / top-p cut, the seed (``torch.manual_seed``
before each pass on the torch paths; CTranslate2 seeded once at load), 1 thread
(``torch.set_num_threads`` = ``intra_threads`` = ``--threads``).

**Tokens per second** = new tokens produced (each path's own outputs, re-tokenized; a row may
end early at the end-of-text token, so the count is what was produced, not the budget) / wall
time of the pass, tokenization and decoding included. The two torch paths draw the same samples
(same logits, same seed: "same as HF" counts identical outputs), so they do the same work.

**Alternating.** Each path runs in its own worker process (``worker_pool.py``: torch's and
CTranslate2's thread pools must not share one), one at a time; each round times every path
once, in rotating order, so that the machine's load drift hits all of them. The figure is the
median over rounds, the ratio the median of the per-round ratios to HF GPT-2 (above 1: faster
than HF), printed with their range.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import ctranslate2
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2LMHeadModel
from worker_pool import WorkerPool, rotations

import tformer
from tformer import ct2
from tformer.convert import to_transformers
from tformer.generation import continue_texts
from tformer.hf import TformerConfig, TformerForCausalLM
from tformer.model import config_for
from tformer.tokenization import SPECIAL_TOKENS, UNK_TOKEN, load_tokenizer, wrap_tokenizer

PATHS = ("HF GPT-2", "tformer", "CT2 float32", "CT2 int8")
#: name -> (layers, heads, d_model, context): nanoGPT's shakespeare_char settings.
SHAPES = {"small": (4, 4, 128, 64), "medium": (6, 6, 384, 256)}
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n"  # 61
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, "
        "it was the season of Light, it was the season of Darkness.")


def char_tokenizer():
    """One token per character, the 4 special tokens first (tformer's ids), no token added."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return wrap_tokenizer(tokenizer)


def build_models(shape: str, root: Path) -> dict[str, str]:
    """The tformer checkpoint, its GPT2LMHeadModel and its two exports: path -> directory."""
    layers, heads, width, context = SHAPES[shape]
    tokenizer = char_tokenizer()
    core = config_for("tiny", len(tokenizer), "gpt2", n_decoder_layers=layers, n_heads=heads,
                      d_model=width, d_ff=4 * width, max_positions=context, dropout=0.0)
    torch.manual_seed(0)
    model = TformerForCausalLM(TformerConfig.from_transformer_config(core)).eval()
    dirs = {"tformer": root / "tformer", "HF GPT-2": root / "gpt2"}
    model.save_pretrained(dirs["tformer"])
    to_transformers(model).save_pretrained(dirs["HF GPT-2"])
    for directory in dirs.values():
        tokenizer.save_pretrained(directory)
    for quantization in ("float32", "int8"):
        dirs[f"CT2 {quantization}"] = ct2.export(dirs["tformer"], root / quantization,
                                                 quantization=quantization)
    return {name: str(directory) for name, directory in dirs.items()}


def worker(conn, name: str, model_dir: str, threads: int) -> None:
    """One path in its own process: load, then answer (prompts, batch_size, options, seed)
    with (seconds, outputs, new tokens) until sent None."""
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)  # CTranslate2 seeds its sampling from it, at load
    if name == "HF GPT-2":
        model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
        tokenizer = load_tokenizer(model_dir)

        def generate(prompts, **options):
            return continue_texts(model, tokenizer, prompts, **options)
    else:
        engine = tformer.load(model_dir, device="cpu",
                              **({"intra_threads": threads} if name.startswith("CT2") else {}))
        generate, tokenizer = engine.generate, engine.tokenizer
    conn.send("ready")
    while (request := conn.recv()) is not None:
        prompts, batch_size, options, seed = request
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = generate(prompts, batch_size=batch_size, **options)
        seconds = time.perf_counter() - start
        new = sum(len(ids) for ids in tokenizer(out, add_special_tokens=False)["input_ids"])
        conn.send((seconds, out, new))


def speed(workers: WorkerPool, prompts: list[str], batch_size: int, options: dict,
          rounds: int) -> dict[str, dict]:
    rates: dict[str, list[float]] = {name: [] for name in PATHS}
    outputs: dict[str, list[str]] = {}
    tokens: dict[str, int] = {}
    for r, name in rotations(PATHS, rounds):
        seconds, outputs[name], tokens[name] = workers.run(
            name, (prompts, batch_size, options, 1000 + r))
        rates[name].append(tokens[name] / seconds)
    result = {}
    for name in PATHS:
        ratios = [a / h for a, h in zip(rates[name], rates["HF GPT-2"])]
        same = sum(a == b for a, b in zip(outputs[name], outputs["HF GPT-2"]))
        result[name] = {"tokens_per_s": statistics.median(rates[name]),
                        "ratio": statistics.median(ratios), "ratios": ratios,
                        "tokens": tokens[name], "same_as_hf": same}
    return result


def prompts_of(n: int, seed: int = 0) -> list[str]:
    """``n`` slices of ``TEXT``, 4 to 16 characters each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(4, 16)
        start = rng.randrange(len(TEXT) - length)
        out.append(TEXT[start : start + length])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=1, help="torch = CTranslate2 threads")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed passes per path (default 5, 3 with --quick)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--quick", action="store_true",
                        help="8 prompts at batch 1, 16 at batch 16 (32 and 64 without)")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    counts = {1: 8, 16: 16} if args.quick else {1: 32, 16: 64}
    rounds = args.rounds or (3 if args.quick else 5)

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.8,
                   top_k=0, top_p=1.0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, ctranslate2 "
          f"{ctranslate2.__version__}; {args.threads} thread(s); {rounds} rounds; sampling "
          f"T 0.8, max_new_tokens {args.max_new_tokens}; load average at start "
          f"{os.getloadavg()[0]:.2f}")
    header = (f"{'shape':6} {'batch':>5} {'path':12} {'tokens/s':>9} {'vs HF GPT-2':>11} "
              f"{'(rounds)':>13} {'new tokens':>10} {'same as HF':>10}")
    print(header)
    print("-" * len(header))
    figures: dict = {}
    for shape in args.shapes:
        with tempfile.TemporaryDirectory(prefix="generate-causal-") as tmp:
            dirs = build_models(shape, Path(tmp))
            workers = WorkerPool(worker, {name: dirs[name] for name in PATHS}, args.threads)
            for batch_size, n in counts.items():
                result = speed(workers, prompts_of(n), batch_size, options, rounds)
                figures[f"{shape}, batch {batch_size}"] = result
                for name, r in result.items():
                    spread = f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}"
                    print(f"{shape:6} {batch_size:>5} {name:12} {r['tokens_per_s']:>9.0f} "
                          f"{r['ratio']:>10.2f}x {spread:>13} {r['tokens']:>10} "
                          f"{r['same_as_hf']:>6}/{n}")
            workers.close()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    goal = {key: round(r["tformer"]["ratio"], 2) for key, r in figures.items()}
    print(f"goal: tformer >= 1x HF GPT-2 generate(): {goal}")
    if args.output is not None:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
