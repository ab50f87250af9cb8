"""Training throughput: tformer's own model through tformer's training loop against a Hugging Face
T5 of about the same size trained with ``Seq2SeqTrainer``, on the same Multi30k examples.

    .venv/bin/python bench/train_throughput.py                  # fp32, 5 timed steps (~3-4 min)
    .venv/bin/python bench/train_throughput.py --quick          # 2 timed steps (~2 min)
    .venv/bin/python bench/train_throughput.py --precision bf16 # or auto (tformer's rule), both
    .venv/bin/python bench/train_throughput.py --hf-sampling random   # one HF variant only
    .venv/bin/python bench/train_throughput.py --profile-only   # where a step's time goes (~2 min)

Times are for an otherwise idle 2-core CPU. bf16 needs a CPU with bf16 matrix units (AMX,
AVX512-BF16) or a GPU: on an AVX2 CPU bf16 matmuls are emulated, ~50x slower than fp32 (the
script prints both speeds first and warns).

**Throughput** is non-pad source + target tokens per second: per optimizer step (one micro-batch,
no accumulation), the number of source positions whose attention mask is 1 plus the number of
target positions whose label is not -100, divided by the wall time of the step. It is the figure
tformer's loop logs as ``tokens_per_s``. Padding positions cost compute but are not counted; the
padding fraction of the timed batches is printed for each side, and so is the throughput in
*positions* (padding included), which compares the raw speed of the two implementations.

What is kept equal:

- **Data and tokenizer.** One BPE tokenizer (vocabulary 8000) is trained on the Multi30k training
  split (source and target) with ``tformer.tokenization.train_tokenizer``; both models use it and
  see the same token ids (``tformer.data.tokenize_examples``, tformer's default truncation).
- **Models.** tformer ``small`` (d_model 256, 4 heads, 4+4 layers, d_ff 1024; post-norm,
  sinusoidal positions, tied embeddings) against ``T5ForConditionalGeneration`` with d_model 256,
  d_kv 64, 4 heads, 4+4 layers, d_ff 1024, ReLU feed-forward, tied embeddings, and pad 0, eos 3,
  decoder start 2 from the tokenizer. Parameter counts are printed (9.42M and 9.39M).
- **Training settings.** AdamW (lr 5e-4, betas 0.9/0.98, eps 1e-9, weight decay 0.01),
  inverse-sqrt schedule, dropout 0.1, label smoothing 0.1, gradient clipping at 1.0, no
  accumulation, one process, batches collated in the training process (no loader workers).
- **Precision.** fp32, or bf16 autocast, on both sides (accelerate's ``mixed_precision``, which
  both use). ``--precision auto`` applies tformer's rule (``resolve_precision``) to both.
- **Tokens per batch.** tformer batches by a token budget (``train.max_tokens``, default 4096
  padded positions of the larger of the two tensors; length-bucketed). HF gets a fixed batch
  size such that its *average* non-pad tokens per batch equal tformer's over one epoch (tformer's
  epoch-average tokens per batch / average tokens per example). Two HF variants run by default:
  ``random`` batches (the Trainer's default sampler; the padding this costs is part of what is
  measured) and ``group_by_length`` (``train_sampling_strategy="group_by_length"``, which replaced
  ``group_by_length=True`` in transformers 5; it groups by the *source* length, ``input_ids``).

How the sides are timed (each runs its real training entry point, in its own process):

- tformer: ``tformer.training.train(config)`` itself, with ``train.log_every=1``,
  ``train.max_steps = warmup + steps`` and ``train.eval_every`` beyond the end. The clock is read
  when the loop writes a step's record to ``metrics.jsonl`` (``MetricsLogger.log`` is wrapped by
  this script; the loop is unchanged), tokens are the loop's own counts (``tokens_seen``, checked
  against the batches reproduced from the sampler). The evaluation and checkpoint the loop
  always does after its last step are outside the timing; so is set-up.
- HF: ``Seq2SeqTrainer.train()``; the clock is read in a callback's ``on_step_end`` (after the
  optimizer and scheduler step); tokens are counted by a thin wrapper around
  ``DataCollatorForSeq2Seq`` (batch k is the k-th collated: no accumulation, no workers).
- **Lock-step.** The machine is shared, and its load moves by 2x within minutes; timing one side
  after the other measured the load as much as the code. So the sides run *in turn, one step at
  a time*: at the end of each step a side reports to this script and blocks until its next turn
  (the turn order alternates every round). A step is timed from the moment its side is released
  to the end of the step: the whole of the loop between two step ends (fetching and collating
  the batch, forward, loss, backward, clipping, optimizer and scheduler step, logging), with only
  one side computing at a time. Set-up and the first step of every side overlap and are never
  timed; the first ``--warmup`` steps are excluded, the next ``--steps`` are timed, and the
  figure is total tokens / total time over them.

- ``--threads 1`` runs each side single-threaded. On a machine shared with other jobs it gives
  steadier figures: two-thread OpenMP regions stall whenever another process holds one of the
  two cores (small element-wise ops then take a scheduler time slice each).

``--profile`` (after the table) or ``--profile-only`` shows where a step's time goes, in fp32, on
one of the loop's batches: the pieces of the loop body timed one by one (the functions
``train()`` uses: ``collate_batch``, ``forward_loss``, ``clip_grad_norm_``, AdamW, LambdaLR) with a
few alternatives (AdamW ``foreach``/``fused``, the output projection and loss alone, on non-pad
positions only, without label smoothing, dropout 0); the same batch through T5 with the
Trainer's ``LabelSmoother`` and with ``F.cross_entropy`` (the implementations at equal shapes);
and ``torch.profiler``'s self CPU time by operator group.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/lockstep.py, also when imported
from lockstep import Gate, best_time, run_lockstep  # noqa: E402

# The multi30k folder of the local mirror (tformer data): $TFORMER_DATA_DIR/multi30k/.
DATA = Path(os.environ.get("TFORMER_DATA_DIR", "data")) / "multi30k"
LR, BETAS, EPS, WEIGHT_DECAY, WARMUP_LR = 5e-4, (0.9, 0.98), 1e-9, 0.01, 400
LABEL_SMOOTHING, CLIP, DROPOUT = 0.1, 1.0, 0.1
HF_SAMPLING = ("random", "group_by_length")


@dataclass
class Measured:
    name: str
    precision: str
    params: int
    step_tokens: list[int]  # non-pad source + target tokens of each timed step
    step_seconds: list[float]
    padded_positions: int  # source + target positions of the timed batches, padding included
    batch_desc: str
    notes: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.step_tokens) / sum(self.step_seconds)

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
    sources: list[list[int]]
    labels: list[list[int]]

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)


def prepare(workdir: Path, data_dir: Path) -> Prepared:
    """Train the one tokenizer both sides use and tokenise the training split once."""
    train_path = data_dir / "train.jsonl"
    texts, _ = load_examples(str(train_path), split="train")
    tokenizer = train_tokenizer(
        (t for column in ("source", "target") for t in texts[column]), vocab_size=8000, kind="bpe"
    )
    tokenizer_dir = workdir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)  # as train() loads it from data.tokenizer
    encoded, _ = tokenize_examples(texts, tokenizer, 256, 128)  # tformer's default cut
    columns = encoded.to_dict()
    # A few validation examples only: train() always evaluates after its last step (untimed);
    # a short evaluation keeps the benchmark short.
    val_path = workdir / "val_small.jsonl"
    with (data_dir / "val.jsonl").open(encoding="utf-8") as src, val_path.open("w") as dst:
        for _, line in zip(range(16), src):
            dst.write(line)
    return Prepared(workdir, train_path, val_path, tokenizer_dir, columns["input_ids"],
                    columns["labels"])


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


def run_tformer(gate: Gate, prep: Prepared, precision: str, warmup: int, steps: int,
                max_tokens: int, seed: int) -> Measured:
    import tformer.training.loop as loop
    from tformer.training import load_config, train

    out = prep.workdir / f"tformer-{precision}"
    config = load_config(None, tformer_overrides(prep, precision, warmup + steps, max_tokens,
                                                 seed, out))
    original_log = loop.MetricsLogger.log

    def log(self, split, step, record):  # the loop writes one train record per step
        original_log(self, split, step, record)
        if split == "train":
            gate.step_end()

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
    tokens = [seen[i + 1] - seen[i] for i in range(len(records))][warmup:]
    # The timed batches, reproduced (one process takes epoch 0's batches in order); their
    # non-pad count must be what the loop counted.
    batches = tformer_batches(prep, max_tokens, seed)[warmup:warmup + steps]
    real = sum(len(prep.sources[i]) + len(prep.labels[i]) for b in batches for i in b)
    if real != sum(tokens):
        raise RuntimeError(f"reproduced batches hold {real} tokens, the loop counted "
                           f"{sum(tokens)}")
    padded = sum(len(b) * (max(len(prep.sources[i]) for i in b)
                           + max(len(prep.labels[i]) for i in b)) for b in batches)
    sizes = [len(b) for b in batches]
    return Measured(
        "tformer small, train()", precision,
        sum(p.numel() for p in result.model.parameters()), tokens, gate.step_seconds(warmup),
        padded, f"token budget {max_tokens} ({min(sizes)}-{max(sizes)} examples)",
        {"mean_loss": statistics.mean(r["loss"] for r in records)},
    )


# --- Hugging Face -----------------------------------------------------------------------------


def t5_model(tokenizer, seed: int):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=256, d_kv=64, d_ff=1024, num_layers=4,
        num_decoder_layers=4, num_heads=4, feed_forward_proj="relu", dropout_rate=DROPOUT,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


class CountingCollator:
    """DataCollatorForSeq2Seq, recording non-pad and padded positions of every batch."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches: list[tuple[int, int, int]] = []  # (non-pad tokens, positions, size)

    def __call__(self, features):
        batch = self.inner(features)
        real = int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        padded = batch["input_ids"].numel() + batch["labels"].numel()
        self.batches.append((real, padded, batch["input_ids"].size(0)))
        return batch


def run_hf(gate: Gate, prep: Prepared, precision: str, warmup: int, steps: int,
           batch_size: int, sampling: str, seed: int) -> Measured:
    from datasets import Dataset
    from transformers import (
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
    )

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            gate.step_end()

    tokenizer = prep.tokenizer()
    model = t5_model(tokenizer, seed)
    dataset = Dataset.from_dict({"input_ids": prep.sources, "labels": prep.labels})
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, model=model))
    args = Seq2SeqTrainingArguments(
        output_dir=str(prep.workdir / f"hf-{precision}-{sampling}"), max_steps=warmup + steps,
        per_device_train_batch_size=batch_size, learning_rate=LR, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="inverse_sqrt", warmup_steps=WARMUP_LR,
        label_smoothing_factor=LABEL_SMOOTHING, max_grad_norm=CLIP, bf16=precision == "bf16",
        train_sampling_strategy=sampling, logging_steps=warmup + steps, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available(), seed=seed,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset,
                             data_collator=collator, processing_class=tokenizer,
                             callbacks=[Clock()])
    output = trainer.train()
    if len(gate.ends) != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} steps, saw {len(gate.ends)}")
    timed = collator.batches[warmup:warmup + steps]
    sizes = [t[2] for t in timed]
    return Measured(
        f"HF T5, Seq2SeqTrainer ({sampling})", precision,
        sum(p.numel() for p in model.parameters()), [t[0] for t in timed],
        gate.step_seconds(warmup), sum(t[1] for t in timed),
        f"fixed batch {batch_size}" + ("" if len(set(sizes)) == 1 else f" ({sizes})"),
        {"mean_loss": output.training_loss,  # the Trainer's mean over all steps
         "attn_implementation": model.config._attn_implementation},
    )


# --- profiling --------------------------------------------------------------------------------

GROUPS = {
    # substrings of profiler event names -> a coarse group
    "matmul (linear/mm/bmm)": ("addmm", "aten::mm", "aten::bmm", "matmul", "linear"),
    "attention kernel (sdpa)": ("scaled_dot_product", "_flash_attention", "_efficient_attention"),
    "softmax / cross-entropy": ("softmax", "cross_entropy", "nll_loss"),
    "dropout (bernoulli_)": ("bernoulli",),
    "layer norm": ("layer_norm",),
    "dtype casts / copies": ("aten::to", "aten::_to_copy", "aten::copy_"),
    "fill / zeros": ("aten::fill_", "aten::zero_"),
}



def profile(prep: Prepared, max_tokens: int, seed: int) -> None:
    """Where a training step's time goes, fp32, on one of the loop's batches: the pieces of the
    step one by one, a few alternatives, the same batch through T5, and torch.profiler's
    operator groups. Best of 3 repetitions (the machine is shared: read ratios, not digits)."""
    import torch.nn.functional as F
    from transformers.trainer_pt_utils import LabelSmoother

    from tformer.training import load_config
    from tformer.training.schedule import lr_factor
    from tformer.training.setup import build_model, build_optimizer
    from tformer.training.validation import collate_batch, forward_loss

    class Device:  # what collate_batch needs of the Accelerator
        device = torch.device("cpu")

    tokenizer = prep.tokenizer()
    overrides = tformer_overrides(prep, "fp32", 10, max_tokens, seed, prep.workdir / "unused")
    config = load_config(None, overrides)
    model = build_model(config, tokenizer).train()
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, WARMUP_LR, "inverse_sqrt", 10, 0.0))
    collate = Seq2SeqCollator(tokenizer.pad_token_id, tokenizer.bos_token_id)
    tokens = (prep.sources, prep.labels)
    indices = tformer_batches(prep, max_tokens, seed)[2]
    batch = collate_batch(collate, tokens, indices, Device)
    real = int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
    print(f"\n## profile (fp32): one batch of the loop, source {tuple(batch['input_ids'].shape)}, "
          f"target {tuple(batch['labels'].shape)}, {real} non-pad tokens")

    def forward_backward(m=model):
        m.zero_grad(set_to_none=True)  # as the loop leaves them after each optimizer step
        forward_loss(m, batch, LABEL_SMOOTHING).backward()

    def full_step():
        b = collate_batch(collate, tokens, indices, Device)
        loss = forward_loss(model, b, LABEL_SMOOTHING)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()

    step = best_time(full_step)
    forward = best_time(lambda: forward_loss(model, batch, LABEL_SMOOTHING))
    fwd_bwd = best_time(forward_backward)
    forward_backward()  # leave gradients for the optimizer and clipping
    rows = [
        ("whole step (the loop body)", step),
        ("  forward + loss", forward),
        ("  forward + loss + backward", fwd_bwd),
        ("  collate (Seq2SeqCollator)", best_time(
            lambda: collate_batch(collate, tokens, indices, Device))),
        ("  clip_grad_norm_", best_time(
            lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))),
        ("  AdamW step (default: per-tensor)", best_time(optimizer.step)),
        ("  LambdaLR step", best_time(scheduler.step)),
    ]
    for options in (dict(foreach=True), dict(fused=True)):
        alt = torch.optim.AdamW(build_optimizer(model, config).param_groups, lr=LR, betas=BETAS,
                                eps=EPS, **options)
        rows.append((f"  AdamW step {options}", best_time(alt.step)))
    # The output projection and the loss over the (B, T, V) logits, alone.
    hidden = torch.randn(*batch["labels"].shape, model.config.d_model, requires_grad=True)
    weight = model.get_input_embeddings().weight
    labels = batch["labels"]

    def head(smoothing: float = LABEL_SMOOTHING, keep=None):
        h, y = (hidden, labels) if keep is None else (hidden[keep], labels[keep])
        logits = F.linear(h, weight)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1),
                        ignore_index=-100, label_smoothing=smoothing).backward()

    rows += [
        ("  output projection + CE, fwd+bwd", best_time(head)),
        ("    same, non-pad positions only", best_time(lambda: head(keep=labels != -100))),
        ("    same, no label smoothing", best_time(lambda: head(0.0))),
    ]
    no_dropout = build_model(load_config(None, [*overrides, "model.dropout=0.0"]),
                             tokenizer).train()
    rows.append(("  forward+backward with dropout 0 (vs 0.1 above)",
                 best_time(lambda: forward_backward(no_dropout))))
    for name, seconds in rows:
        print(f"  {name:<52} {seconds * 1000:8.1f} ms  {100 * seconds / step:5.1f}% of a step")
    enc = sum(p.numel() for p in model.model.encoder.parameters())
    dec = sum(p.numel() for p in model.model.decoder.parameters())
    src_tokens = int(batch["attention_mask"].sum())
    tgt_positions = batch["labels"].numel()
    flops = 6 * (enc * batch["input_ids"].numel() + (dec + weight.numel()) * tgt_positions)
    print(f"  matmul work of the step ~{flops / 1e9:.0f} GFLOP (6 x parameters x positions): "
          f"{flops / step / 1e9:.0f} GFLOP/s achieved; a bare fp32 matmul runs at "
          f"{matmul_gflops(torch.float32, 512):.0f} GFLOP/s now ({src_tokens} source tokens)")

    # The same batch through both models: the implementations at equal shapes.
    t5 = t5_model(tokenizer, seed).train()
    smoother = LabelSmoother(epsilon=LABEL_SMOOTHING)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}

    def t5_step(trainer_loss: bool):
        t5.zero_grad(set_to_none=True)
        out = t5(**inputs)
        if trainer_loss:  # what Seq2SeqTrainer does with label_smoothing_factor > 0
            loss = smoother(out, labels)
        else:
            loss = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), labels.reshape(-1),
                                   ignore_index=-100, label_smoothing=LABEL_SMOOTHING)
        loss.backward()

    contenders = {
        "tformer (forward_loss)": forward_backward,
        "T5 + Trainer's LabelSmoother": lambda: t5_step(True),
        "T5 + F.cross_entropy": lambda: t5_step(False),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    for rep in range(4):  # interleaved, order reversed every repetition
        for name in (list(contenders) if rep % 2 == 0 else list(contenders)[::-1]):
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        t5.zero_grad(set_to_none=True)
    print("  same batch, forward+backward (best of 4, interleaved):")
    base = min(times["tformer (forward_loss)"])
    for name, ts in times.items():
        print(f"    {name:<34} {min(ts):6.2f} s  {min(ts) / base:4.2f}x tformer's time")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        full_step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print("  torch.profiler, one whole step, self CPU time by operator group:")
    for group, needles in GROUPS.items():
        t = sum(e.self_cpu_time_total for e in events if any(n in e.key for n in needles))
        print(f"    {group:<28} {100 * t / total:5.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40))


def matmul_gflops(dtype: torch.dtype, n: int = 256, reps: int = 5) -> float:
    """A (n, n) @ (n, 4n) matmul's speed: whether this CPU has fast bf16 units (AMX or
    AVX512-BF16) or emulates bf16, far slower than fp32 (AVX2 machines)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, 4 * n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n * n * 4 * n * reps / (time.perf_counter() - start) / 1e9


# --- report -----------------------------------------------------------------------------------


def print_table(results: list[Measured]) -> None:
    print("\n| precision | model, training | params | batches | padding | tokens/s "
          "| positions/s (pad incl.) | median s/step | mean loss |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for m in results:
        print(f"| {m.precision} | {m.name} | {m.params / 1e6:.2f}M | {m.batch_desc} | "
              f"{100 * m.padding:.1f}% | {m.tokens_per_s:,.0f} | {m.positions_per_s:,.0f} | "
              f"{statistics.median(m.step_seconds):.2f} | {m.notes['mean_loss']:.3f} |")
    print("\n| precision | peer | tformer tokens/s | peer tokens/s | **ratio tformer/peer** | "
          "ratio per position (pad incl.) |")
    print("|---|---|---:|---:|---:|---:|")
    for ours in (m for m in results if m.name.startswith("tformer")):
        for peer in (m for m in results if m.precision == ours.precision and m is not ours
                     and not m.name.startswith("tformer")):
            print(f"| {ours.precision} | {peer.name} | {ours.tokens_per_s:,.0f} | "
                  f"{peer.tokens_per_s:,.0f} | **{ours.tokens_per_s / peer.tokens_per_s:.2f}x** | "
                  f"{ours.positions_per_s / peer.positions_per_s:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto", "both"], default="fp32",
                        help="auto: tformer's rule (resolve_precision); both: fp32, then bf16")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tformer's train.max_tokens")
    parser.add_argument("--hf-sampling", choices=[*HF_SAMPLING, "both"], default="both",
                        help="HF's train_sampling_strategy (both: one HF run with each)")
    parser.add_argument("--quick", action="store_true", help="2 timed steps after 1 warm-up")
    parser.add_argument("--profile", action="store_true",
                        help="also show where a step's time goes (fp32; ~2 min)")
    parser.add_argument("--profile-only", action="store_true",
                        help="only the --profile part, no throughput run")
    parser.add_argument("--data", type=Path, default=DATA, help="the multi30k directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per side (default: torch's, = cores); 1 is steadier "
                             "on a machine shared with other jobs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    # Inherited by the side processes. (The loop's own progress bar, on stderr, stays.)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    from tformer.training import load_config
    from tformer.training.setup import resolve_precision

    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); matmul {fp32:.0f} GFLOP/s fp32, {bf16:.1f} "
          f"bf16; load average {os.getloadavg()[0]:.2f}")
    if args.precision in ("bf16", "both") and not torch.cuda.is_available() and bf16 < fp32 / 2:
        print("warning: bf16 matmuls are emulated on this CPU (far slower than fp32); a bf16 "
              "run will take a very long time")
    with tempfile.TemporaryDirectory(prefix="tformer-bench-") as tmp:
        start = time.perf_counter()
        prep = prepare(Path(tmp), args.data)
        batches = tformer_batches(prep, args.max_tokens, args.seed)
        batch_size, per_batch = matched_batch_size(prep, batches)
        epoch_padding = padding_fraction(batches, [len(x) for x in prep.sources],
                                         [len(y) for y in prep.labels])
        print(f"data: {len(prep.sources)} training examples, vocabulary "
              f"{len(prep.tokenizer())}; tformer: {len(batches)} batches/epoch, "
              f"{per_batch:.0f} non-pad tokens/batch, padding {100 * epoch_padding:.1f}% over the "
              f"epoch; HF: batch size {batch_size} (same tokens/batch on average)", flush=True)
        if args.profile_only:
            profile(prep, args.max_tokens, args.seed)
            return

        precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
        sampling = HF_SAMPLING if args.hf_sampling == "both" else (args.hf_sampling,)
        results: list[Measured] = []
        for precision in precisions:
            if precision == "auto":
                rule = resolve_precision("auto", load_config(None, ["model.size=small"]))
                precision = {"no": "fp32"}.get(rule, rule)
                print(f"auto precision (tformer's rule on this machine) -> {precision}")
            common = dict(prep=prep, precision=precision, warmup=args.warmup, steps=args.steps,
                          seed=args.seed)
            sides = [(run_tformer, dict(common, max_tokens=args.max_tokens))]
            sides += [(run_hf, dict(common, batch_size=batch_size, sampling=s)) for s in sampling]
            measured = run_lockstep(sides, args.warmup + args.steps)
            print(f"{precision}: " + ", ".join(f"{m.name} {m.tokens_per_s:,.0f} tok/s"
                                                for m in measured)
                  + f" (T5 attention: {measured[-1].notes['attn_implementation']})", flush=True)
            results += measured
        print_table(results)
        print(f"\ntimed: {args.steps} optimizer steps per side after {args.warmup} untimed, the "
              f"sides in lock-step; tokens = non-pad source + target tokens; load average now "
              f"{os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s")
        if args.profile:
            profile(prep, args.max_tokens, args.seed)


if __name__ == "__main__":
    main()
