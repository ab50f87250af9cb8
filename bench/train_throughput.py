"""Training throughput: tformer's own model through tformer's training loop against a Hugging Face
T5 of about the same size trained with ``Seq2SeqTrainer``, on the same Multi30k examples.

    .venv/bin/python bench/train_throughput.py                     # 20 timed steps, fp32 + bf16
    .venv/bin/python bench/train_throughput.py --precision bf16    # one precision
    .venv/bin/python bench/train_throughput.py --quick             # 6 timed steps, auto precision
    .venv/bin/python bench/train_throughput.py --group-by-length   # HF gets length grouping
    .venv/bin/python bench/train_throughput.py --profile           # + where the time goes

Throughput is **non-pad source + target tokens per second**: per optimizer step (one micro-batch,
no accumulation), the number of source positions whose attention mask is 1 plus the number of
target positions whose label is not -100, divided by wall time. It is exactly the figure
tformer's loop logs as ``tokens_per_s``. Padding positions cost compute but are not counted.

What is compared, and kept equal:

- **Data and tokenizer.** One BPE tokenizer (vocabulary 8000) is trained on the Multi30k training
  split (source and target) with ``tformer.tokenization.train_tokenizer``; both models use it and
  both see the same token ids (``tformer.data.tokenize_examples``, same truncation).
- **Models.** tformer ``small`` (d_model 256, 4 heads, 4+4 layers, d_ff 1024, post-norm,
  sinusoidal positions, tied embeddings) against ``T5ForConditionalGeneration`` with d_model 256,
  d_kv 64, 4 heads, 4+4 layers, d_ff 1024, ReLU FFN, tied embeddings; pad 0, eos 3, decoder start
  2 from the tokenizer. Parameter counts are printed.
- **Training settings.** AdamW (lr 5e-4, betas 0.9/0.98, eps 1e-9, weight decay 0.01),
  inverse-sqrt schedule, dropout 0.1, label smoothing 0.1, gradient clipping at 1.0, no
  accumulation, one process, data collated in the main process (no workers).
- **Precision.** fp32 or bf16 autocast on both sides (accelerate's ``mixed_precision``, which both
  use). tformer's ``train.precision=auto`` picks bf16 on a CPU for d_model >= 256
  (``tformer.training.loop.resolve_precision``), so ``--precision auto`` means bf16 here.
- **Batch size.** tformer batches by a token budget (``train.max_tokens``, default 4096 padded
  positions of the larger of the two tensors, length-bucketed). HF gets a fixed batch size
  chosen so that its *average* number of non-pad tokens per batch equals tformer's over one
  epoch (epoch-average tformer tokens per batch / average tokens per example). By default HF
  batches are random (its default ``train_sampling_strategy="random"``), so the extra padding it
  pays is part of what is measured; ``--group-by-length`` gives HF
  ``train_sampling_strategy="group_by_length"`` (``group_by_length=True`` of older versions;
  transformers 5 groups by the *source* length, ``input_ids``). The padding fraction of the
  timed batches is printed for both.

How each side is timed (the same way, and the same code a user runs):

- tformer: ``tformer.training.train(config)`` itself, with ``train.log_every=1``,
  ``train.max_steps = warmup + steps`` and ``train.eval_every`` beyond the end. The loop logs a
  record per step to ``metrics.jsonl`` whose window runs from the end of the previous step's log
  to the end of this step's (collation, forward, backward, clipping, optimizer and scheduler
  step, token counting, logging): consecutive and gap-free. The time of step k is its
  ``tokens / tokens_per_s``. The evaluation and checkpoint the loop always does at the last step
  happen after that step's record, so they are outside the timing; so is set-up (loading,
  tokenising, building the model). ``log_every=1`` adds one JSON line and four TensorBoard
  scalars per step to the loop (well under 1% of a step here).
- HF: ``Seq2SeqTrainer.train()`` with a callback that reads the clock at every
  ``on_step_end`` (after the optimizer and scheduler step); the time of step k is the difference
  of consecutive readings, which covers fetching and collating the batch, forward, loss, backward,
  clipping and the optimizer step. Tokens are counted by a thin wrapper around
  ``DataCollatorForSeq2Seq`` (batch k is the k-th one collated: no accumulation, no workers).
- The first ``--warmup`` steps of each side are excluded; the next ``--steps`` are timed. The
  figure is total tokens / total time over the timed steps.

``--profile`` then runs the pieces of one training step of each side (the same functions
``train()`` and ``Trainer.training_step`` call) under ``torch.profiler`` and prints where the
time goes: the operators with the most self CPU time, and the time in a few named groups.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run without installing

from tformer.data import (  # noqa: E402
    Seq2SeqCollator,
    TokenBudgetBatchSampler,
    load_examples,
    padding_fraction,
    tokenize_examples,
)
from tformer.tokenization import load_tokenizer, train_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"
LR, BETAS, EPS, WEIGHT_DECAY, WARMUP_LR = 5e-4, (0.9, 0.98), 1e-9, 0.01, 400
LABEL_SMOOTHING, CLIP, DROPOUT = 0.1, 1.0, 0.1


@dataclass
class Measured:
    name: str
    precision: str
    params: int
    step_tokens: list[int]  # non-pad source + target tokens of each timed step
    step_seconds: list[float]
    step_cpu: list[float]  # this process's CPU seconds (all threads) of each timed step
    padded_positions: int  # source + target positions of the timed batches, padding included
    batch_desc: str
    notes: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.step_tokens) / sum(self.step_seconds)

    @property
    def tokens_per_cpu_s(self) -> float:
        return sum(self.step_tokens) / sum(self.step_cpu)

    @property
    def positions_per_s(self) -> float:
        return self.padded_positions / sum(self.step_seconds)

    @property
    def padding(self) -> float:
        return 1.0 - sum(self.step_tokens) / self.padded_positions


# --- shared data ------------------------------------------------------------------------------


@dataclass
class Prepared:
    workdir: Path
    train_path: Path
    val_path: Path
    tokenizer_dir: Path
    tokenizer: object
    sources: list[list[int]]
    labels: list[list[int]]


def prepare(workdir: Path, data_dir: Path) -> Prepared:
    """Train the one tokenizer both sides use and tokenise the training split once."""
    train_path = data_dir / "train.jsonl"
    texts, _ = load_examples(str(train_path), split="train")
    tokenizer = train_tokenizer(
        (t for column in ("source", "target") for t in texts[column]), vocab_size=8000, kind="bpe"
    )
    tokenizer_dir = workdir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)  # what train() will load from data.tokenizer
    encoded, _ = tokenize_examples(texts, tokenizer, 256, 128)  # tformer's default cut
    columns = encoded.to_dict()
    # A few validation examples only: train() always evaluates at its last step (outside the
    # timing), and a short evaluation keeps the benchmark short.
    val_path = workdir / "val_small.jsonl"
    with (data_dir / "val.jsonl").open(encoding="utf-8") as src, val_path.open("w") as dst:
        for _, line in zip(range(16), src):
            dst.write(line)
    return Prepared(workdir, train_path, val_path, tokenizer_dir, tokenizer,
                    columns["input_ids"], columns["labels"])


def tformer_batches(prep: Prepared, max_tokens: int, seed: int) -> list[list[int]]:
    """Epoch 0 of the loop's batches: the order train() takes them in on one process."""
    src = [len(x) for x in prep.sources]
    tgt = [len(y) for y in prep.labels]
    return TokenBudgetBatchSampler(src, tgt, max_tokens=max_tokens, seed=seed).batches(0)


def matched_batch_size(prep: Prepared, batches: list[list[int]]) -> tuple[int, float]:
    total = sum(len(x) + len(y) for x, y in zip(prep.sources, prep.labels))
    per_batch = total / len(batches)
    return max(1, round(per_batch / (total / len(prep.sources)))), per_batch


# --- tformer ----------------------------------------------------------------------------------


def tformer_overrides(prep: Prepared, precision: str, total_steps: int, max_tokens: int,
                      seed: int, out: Path) -> list[str]:
    return [
        f"data.train={prep.train_path}", f"data.validation={prep.val_path}",
        f"data.tokenizer={prep.tokenizer_dir}", "model.size=small",
        f"model.dropout={DROPOUT}", f"train.output_dir={out}", f"train.seed={seed}",
        f"train.max_steps={total_steps}", f"train.max_tokens={max_tokens}",
        f"train.lr={LR}", f"train.warmup_steps={WARMUP_LR}", "train.schedule=inverse_sqrt",
        f"train.weight_decay={WEIGHT_DECAY}", f"train.label_smoothing={LABEL_SMOOTHING}",
        f"train.clip_grad_norm={CLIP}", f"train.precision={precision}", "train.log_every=1",
        f"train.eval_every={10**9}", "train.eval_max_examples=1", "train.max_new_tokens=4",
        "train.keep_last=1",
    ]


def run_tformer(prep: Prepared, precision: str, warmup: int, steps: int, max_tokens: int,
                seed: int) -> Measured:
    import tformer.training.loop as loop
    from tformer.training import load_config, train

    out = prep.workdir / f"tformer-{precision}"
    config = load_config(None, tformer_overrides(prep, precision, warmup + steps, max_tokens,
                                                 seed, out))
    # Only for the CPU-time cross-check: read the process CPU clock when the loop writes each
    # step's record (the wall-clock figures come from metrics.jsonl, the loop's own).
    cpu_marks: list[float] = []
    original_log = loop.MetricsLogger.log

    def log(self, split, step, record):
        original_log(self, split, step, record)
        if split == "train":
            cpu_marks.append(time.process_time())

    loop.MetricsLogger.log = log
    try:
        result = train(config)
    finally:
        loop.MetricsLogger.log = original_log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = sorted((r for r in records if r["split"] == "train"), key=lambda r: r["step"])
    if [r["step"] for r in records] != list(range(1, warmup + steps + 1)):
        raise RuntimeError("expected one train record per step in metrics.jsonl")
    seen = [0] + [r["tokens_seen"] for r in records]
    tokens = [seen[i + 1] - seen[i] for i in range(len(records))]
    seconds = [tok / r["tokens_per_s"] for tok, r in zip(tokens, records)]
    # The timed batches, reproduced (the loop takes epoch 0's batches in order on one process);
    # their non-pad count must equal what the loop counted.
    batches = tformer_batches(prep, max_tokens, seed)[warmup:warmup + steps]
    real = sum(len(prep.sources[i]) + len(prep.labels[i]) for b in batches for i in b)
    if real != sum(tokens[warmup:]):
        raise RuntimeError(f"reproduced batches hold {real} tokens, the loop counted "
                           f"{sum(tokens[warmup:])}")
    padded = sum(len(b) * (max(len(prep.sources[i]) for i in b) + max(len(prep.labels[i])
                                                                      for i in b))
                 for b in batches)
    sizes = [len(b) for b in batches]
    model = result.model
    return Measured(
        "tformer small + train()", precision, sum(p.numel() for p in model.parameters()),
        tokens[warmup:], seconds[warmup:],
        [b - a for a, b in zip(cpu_marks[warmup - 1:], cpu_marks[warmup:])], padded,
        f"token budget {max_tokens} (batch {min(sizes)}-{max(sizes)})",
        {"final_loss": records[-1]["loss"]},
    )


# --- Hugging Face -----------------------------------------------------------------------------


def t5_model(tokenizer, seed: int):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=256, d_kv=64, d_ff=1024, num_layers=4,
        num_decoder_layers=4, num_heads=4, feed_forward_proj="relu", dropout_rate=DROPOUT,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


class CountingCollator:
    """DataCollatorForSeq2Seq, recording non-pad and padded positions of every batch."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches: list[tuple[int, int, int]] = []  # (non-pad tokens, padded positions, size)

    def __call__(self, features):
        batch = self.inner(features)
        real = int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        padded = batch["input_ids"].numel() + batch["labels"].numel()
        self.batches.append((real, padded, batch["input_ids"].size(0)))
        return batch


def run_hf(prep: Prepared, precision: str, warmup: int, steps: int, batch_size: int,
           group_by_length: bool, seed: int) -> Measured:
    from datasets import Dataset
    from transformers import (
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
    )

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    model = t5_model(prep.tokenizer, seed)
    dataset = Dataset.from_dict({"input_ids": prep.sources, "labels": prep.labels})
    collator = CountingCollator(DataCollatorForSeq2Seq(prep.tokenizer, model=model))
    args = Seq2SeqTrainingArguments(
        output_dir=str(prep.workdir / f"hf-{precision}"), max_steps=warmup + steps,
        per_device_train_batch_size=batch_size, learning_rate=LR, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="inverse_sqrt", warmup_steps=WARMUP_LR,
        label_smoothing_factor=LABEL_SMOOTHING, max_grad_norm=CLIP, bf16=precision == "bf16",
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        logging_steps=warmup + steps, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available(), seed=seed,
    )
    clock = Clock()
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset,
                             data_collator=collator, processing_class=prep.tokenizer,
                             callbacks=[clock])
    output = trainer.train()
    if len(clock.ends) != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} steps, saw {len(clock.ends)}")
    timed = collator.batches[warmup:warmup + steps]
    seconds = [b - a for a, b in zip(clock.ends[warmup - 1:], clock.ends[warmup:])]
    sampling = "length-grouped" if group_by_length else "random"
    return Measured(
        "HF T5 + Seq2SeqTrainer", precision, sum(p.numel() for p in model.parameters()),
        [t[0] for t in timed], seconds,
        [b - a for a, b in zip(clock.cpu[warmup - 1:], clock.cpu[warmup:])],
        sum(t[1] for t in timed),
        f"fixed batch {batch_size}, {sampling}",
        {"final_loss": output.training_loss,
         "attn_implementation": model.config._attn_implementation},
    )


# --- profiling --------------------------------------------------------------------------------

GROUPS = {
    # substrings of profiler event names -> a coarse group
    "matmul (linear/bmm/mm)": ("addmm", "aten::mm", "aten::bmm", "matmul", "linear"),
    "attention kernel (sdpa)": ("scaled_dot_product", "_flash_attention", "_efficient_attention"),
    "softmax / log_softmax / CE": ("softmax", "cross_entropy", "nll_loss", "_log_softmax"),
    "dtype casts (to/copy_)": ("aten::to", "aten::_to_copy", "aten::copy_"),
    "optimizer (AdamW)": ("Optimizer.step", "_foreach", "adamw"),
    "grad clipping (norm)": ("clip_grad", "linalg_vector_norm", "aten::norm"),
    "embedding": ("embedding",),
    "dropout": ("dropout", "bernoulli"),
    "layer norm / T5 rms norm": ("layer_norm", "aten::pow", "aten::rsqrt", "aten::mean"),
}


def profile_sides(prep: Prepared, precision: str, steps: int, batch_size: int, max_tokens: int,
                  seed: int) -> None:
    """One training step of each side under torch.profiler, on the same kind of batches the
    timed run used: which operators take the time."""
    from accelerate import Accelerator
    from transformers import DataCollatorForSeq2Seq
    from transformers.trainer_pt_utils import LabelSmoother

    from tformer.training import load_config
    from tformer.training.loop import (
        build_optimizer,
        collate_batch,
        forward_loss,
        resolve_precision,
    )
    from tformer.training.setup import build_model

    config = load_config(None, tformer_overrides(prep, precision, 10, max_tokens, seed,
                                                 prep.workdir / "unused"))
    accelerator = Accelerator(mixed_precision=resolve_precision(precision, config), cpu=True)
    tokens = (prep.sources, prep.labels)
    batches = tformer_batches(prep, max_tokens, seed)

    # tformer: the loop body of train(), with the loop's own functions
    model = build_model(config, prep.tokenizer)
    optimizer = build_optimizer(model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    collate = Seq2SeqCollator(prep.tokenizer.pad_token_id, prep.tokenizer.bos_token_id)
    model.train()

    def tformer_step(i: int) -> None:
        with torch.profiler.record_function("## collate"):
            batch = collate_batch(collate, tokens, batches[i], accelerator)
        with torch.profiler.record_function("## forward+loss"):
            loss = forward_loss(model, batch, LABEL_SMOOTHING)
        with torch.profiler.record_function("## backward"):
            accelerator.backward(loss)
        with torch.profiler.record_function("## clip"):
            accelerator.clip_grad_norm_(model.parameters(), CLIP)
        with torch.profiler.record_function("## optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()

    # HF: what Trainer.training_step does for this configuration (autocast forward, the
    # LabelSmoother on the logits, backward), then clipping and AdamW
    t5 = t5_model(prep.tokenizer, seed)
    hf_opt = torch.optim.AdamW(t5.parameters(), lr=LR, betas=BETAS, eps=EPS,
                               weight_decay=WEIGHT_DECAY)
    hf_acc = Accelerator(mixed_precision=resolve_precision(precision, config), cpu=True)
    t5, hf_opt = hf_acc.prepare(t5, hf_opt)
    t5.train()
    hf_collate = DataCollatorForSeq2Seq(prep.tokenizer, model=hf_acc.unwrap_model(t5))
    smoother = LabelSmoother(epsilon=LABEL_SMOOTHING)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prep.sources), generator=gen).tolist()

    def hf_step(i: int) -> None:
        with torch.profiler.record_function("## collate"):
            rows = order[i * batch_size:(i + 1) * batch_size]
            batch = hf_collate([{"input_ids": prep.sources[j], "labels": prep.labels[j]}
                                for j in rows])
            labels = batch.pop("labels")
        with torch.profiler.record_function("## forward+loss"):
            out = t5(**batch)
            loss = smoother(out, labels)
        with torch.profiler.record_function("## backward"):
            hf_acc.backward(loss)
        with torch.profiler.record_function("## clip"):
            hf_acc.clip_grad_norm_(t5.parameters(), CLIP)
        with torch.profiler.record_function("## optimizer"):
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
        loss.item()

    for name, step in (("tformer", tformer_step), ("HF T5", hf_step)):
        for i in range(2):  # warm-up, not profiled
            step(i)
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for i in range(2, 2 + steps):
                step(i)
        wall = time.perf_counter() - start
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n### profile: {name}, {precision}, {steps} steps, {wall:.2f} s wall "
              f"(profiled), self CPU total {total / 1e6:.2f} s")
        print("phases (CPU time incl. children):")
        for e in sorted(events, key=lambda e: -e.cpu_time_total):
            if e.key.startswith("## "):
                print(f"  {e.key[3:]:<16} {e.cpu_time_total / 1e6:7.2f} s "
                      f"{100 * e.cpu_time_total / total:5.1f}%")
        print("groups (self CPU time):")
        for group, needles in GROUPS.items():
            t = sum(e.self_cpu_time_total for e in events
                    if any(n in e.key for n in needles) and not e.key.startswith("## "))
            print(f"  {group:<28} {t / 1e6:7.2f} s {100 * t / total:5.1f}%")
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48))


# --- report -----------------------------------------------------------------------------------


def print_table(rows: list[tuple[Measured, Measured]]) -> None:
    print("\n| precision | model | params | batches | padding | tokens/s | positions/s "
          "(pad incl.) | tokens/CPU-s | median s/step | loss at end |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for ours, peer in rows:
        for m in (ours, peer):
            print(f"| {m.precision} | {m.name} | {m.params / 1e6:.2f}M | {m.batch_desc} | "
                  f"{100 * m.padding:.1f}% | {m.tokens_per_s:,.0f} | {m.positions_per_s:,.0f} | "
                  f"{m.tokens_per_cpu_s:,.0f} | {statistics.median(m.step_seconds):.2f} | "
                  f"{m.notes['final_loss']:.3f} |")
    print("\n| precision | tformer tokens/s | HF tokens/s | ratio tformer/HF | "
          "ratio per CPU-s | ratio per position (pad incl.) |")
    print("|---|---:|---:|---:|---:|---:|")
    for ours, peer in rows:
        print(f"| {ours.precision} | {ours.tokens_per_s:,.0f} | {peer.tokens_per_s:,.0f} | "
              f"**{ours.tokens_per_s / peer.tokens_per_s:.2f}x** | "
              f"{ours.tokens_per_cpu_s / peer.tokens_per_cpu_s:.2f}x | "
              f"{ours.positions_per_s / peer.positions_per_s:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto", "both"], default="auto",
                        help="auto = tformer's rule (resolve_precision); both = fp32 then bf16")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tformer's train.max_tokens")
    parser.add_argument("--group-by-length", action="store_true",
                        help="HF train_sampling_strategy=group_by_length (default: random)")
    parser.add_argument("--quick", action="store_true",
                        help="3 timed steps, 1 warm-up (~1.5 min on an idle 2-core CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of each side with torch.profiler")
    parser.add_argument("--data", type=Path, default=DATA, help="multi30k directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the loop's progress bar
    import datasets

    datasets.disable_progress_bars()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory(prefix="tformer-bench-") as tmp:
        start = time.perf_counter()
        prep = prepare(Path(tmp), args.data)
        batches = tformer_batches(prep, args.max_tokens, args.seed)
        batch_size, per_batch = matched_batch_size(prep, batches)
        epoch_padding = padding_fraction(batches, [len(x) for x in prep.sources],
                                         [len(y) for y in prep.labels])
        print(f"data: {len(prep.sources)} training examples, vocabulary {len(prep.tokenizer)}; "
              f"tformer: {len(batches)} batches/epoch, {per_batch:.0f} non-pad tokens/batch, "
              f"padding {100 * epoch_padding:.1f}% over the epoch; HF batch size {batch_size} "
              f"(same tokens/batch on average); set-up {time.perf_counter() - start:.0f} s")

        from tformer.training import load_config
        from tformer.training.loop import resolve_precision

        precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
        rows = []
        for k, precision in enumerate(precisions):
            if precision == "auto":
                rule = resolve_precision("auto", load_config(None, ["model.size=small"]))
                precision = {"no": "fp32"}.get(rule, rule)
                print(f"auto precision -> {precision}")
            measure = [
                lambda p=precision: run_tformer(prep, p, args.warmup, args.steps,
                                                args.max_tokens, args.seed),
                lambda p=precision: run_hf(prep, p, args.warmup, args.steps, batch_size,
                                           args.group_by_length, args.seed),
            ]
            if k % 2:  # alternate which side runs first, against drift in a shared machine
                ours, peer = measure[0](), measure[1]()
            else:
                peer, ours = measure[1](), measure[0]()
            print(f"{precision}: tformer {ours.tokens_per_s:,.0f} tok/s, "
                  f"HF {peer.tokens_per_s:,.0f} tok/s "
                  f"(HF attention: {peer.notes['attn_implementation']})", flush=True)
            rows.append((ours, peer))
        print_table(rows)
        print(f"\ntimed: {args.steps} optimizer steps per side after {args.warmup} warm-up "
              f"steps; tokens = non-pad source + target tokens; load average now "
              f"{os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s")
        if args.profile:
            profile_sides(prep, rows[-1][0].precision, 3, batch_size, args.max_tokens,
                          args.seed)


if __name__ == "__main__":
    main()
