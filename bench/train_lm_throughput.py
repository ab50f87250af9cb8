"""Decoder-only training throughput: tformer's GPT (``TformerForCausalLM``, the ``gpt2`` preset)
trained by tformer's own loop against ``transformers.GPT2LMHeadModel`` of the same size trained by
the Hugging Face ``Trainer``, on the same token windows (issue 28).

    TFORMER_DATA_DIR=/path/to/mirror OMP_NUM_THREADS=1 \
        .venv/bin/python bench/train_lm_throughput.py             # 30 timed steps (~2 min)
    .venv/bin/python bench/train_lm_throughput.py --steps 100     # steadier
    .venv/bin/python bench/train_lm_throughput.py --profile-only  # where a step's time goes

The shape is ``recipes/shakespeare_char.yaml`` (nanoGPT's CPU setting): 4 layers, 4 heads, 128
wide, feed-forward 512, context 64, 12 windows a batch (768 tokens), dropout 0, fp32, one thread
per side (``--threads``). Data: Tiny Shakespeare, characters (vocabulary 65 + 4 special tokens),
from ``$TFORMER_DATA_DIR/tinyshakespeare`` (the recipe's ``data.dataset``), or downloaded.

What is kept equal:

- **Windows.** The parent process builds the recipe's training stream and its sampler
  (``tformer.training.setup``: ``load_texts``, ``get_tokenizer``, ``tokenize_splits``,
  ``LMTrainSplit``) and reads the windows of every step the run will take (batch k is
  ``RandomWindows.batch(k)``). HF gets exactly those, in order (``train_sampling_strategy=
  "sequential"``), with the targets given as ``shift_labels`` so that GPT-2's loss scores all 64
  positions of a window, as tformer's does (``labels=input_ids`` would score 63). The tformer side
  checks that its loop collated the same windows.
- **Models.** GPT-2 with n_layer 4, n_head 4, n_embd 128, n_inner 512, n_positions 64, the char
  vocabulary, all dropouts 0, tied embeddings, ``attn_implementation="sdpa"``. tformer's recipe
  has ``bias: false`` (nanoGPT's default); GPT-2 always has biases: the parameter counts are
  printed (about 0.80M and 0.81M).
- **Training.** AdamW lr 1e-3, betas 0.9/0.99, eps 1e-8, weight decay 0.1 (each side's own
  choice of which tensors decay), 100 warm-up steps then cosine, gradient clipping at 1.0, no
  accumulation, fp32, batches built in the training process (no loader workers).
- **Tokens.** 12 x 64 = 768 targets a step on both sides (no padding).

Timing: each side runs its real entry point (``tformer.training.train(config)``;
``Trainer.train()``), in its own process, in lock-step (``bench/lockstep.py``): one step at a time,
in turn, the order alternating each round. tformer's step ends when the loop updates its progress
bar (``TrainProgress.update``, after the optimizer and scheduler step; the loop is unchanged,
its logging every ``train.log_every`` = 10 steps falls inside the timed steps); HF's in a
callback's ``on_step_end``. The first ``--warmup`` steps are not timed; the figure is
768 x steps / total time of the timed steps. Set-up, and the validation and checkpoint that
train() always does after its last step, are outside the timing.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run without installing
sys.path.insert(0, str(ROOT / "bench"))  # bench/lockstep.py
from lockstep import Gate, run_lockstep  # noqa: E402
from lockstep import best_time as _best_of  # noqa: E402

RECIPE = ROOT / "recipes" / "shakespeare_char.yaml"


@dataclass
class Measured:
    name: str
    params: int
    tokens_per_step: int
    step_seconds: list[float]
    notes: dict

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step * len(self.step_seconds) / sum(self.step_seconds)

    @property
    def ms_per_step(self) -> float:
        return 1000 * sum(self.step_seconds) / len(self.step_seconds)


def tformer_config(out: Path, total_steps: int, log_every: int, compile_: bool = False):
    from tformer.training import load_config

    return load_config(RECIPE, [f"train.compile={str(compile_).lower()}",
        f"train.output_dir={out}", f"train.max_steps={total_steps}",
        f"train.log_every={log_every}", f"train.eval_every={10**9}", "train.max_new_tokens=4",
        "train.keep_last=1", "train.precision=fp32",
    ])


def run_windows(config, workdir: Path, total_steps: int) -> tuple[list, list, int]:
    """The inputs and targets of every window the run reads, step by step ((steps x B) rows of
    ``block_size`` ids), and the vocabulary size: what tformer's loop will collate."""
    from tformer.training.setup import LMTrainSplit, get_tokenizer, load_texts, tokenize_splits

    texts, _ = load_texts(config)
    tokenizer = get_tokenizer(config, workdir, texts["train"], True)
    split = LMTrainSplit(config, tokenize_splits(config, texts, tokenizer).tokens["train"])
    inputs, targets = split.tokens(0)
    starts = [s for k in range(total_steps) for s in split.sampler.batch(k)]
    return ([inputs[s].tolist() for s in starts], [targets[s].tolist() for s in starts],
            len(tokenizer))


# --- tformer ----------------------------------------------------------------------------------


def run_tformer(gate: Gate, workdir: Path, total_steps: int, warmup: int, log_every: int,
                inputs: list, targets: list, compile_: bool) -> Measured:
    import tformer.training.loop as loop
    from tformer.training import train

    config = tformer_config(workdir / "tformer", total_steps, log_every, compile_)
    seen: list[torch.Tensor] = []
    original_update, original_collate = loop.TrainProgress.update, loop.collate_batch

    def update(self, step, seconds):  # once per optimizer step, after the scheduler's step
        original_update(self, step, seconds)
        gate.step_end()

    def collate(*args, **kwargs):  # keeps a reference to the inputs; compared after the run
        batch = original_collate(*args, **kwargs)
        seen.append(batch["input_ids"])
        return batch

    loop.TrainProgress.update, loop.collate_batch = update, collate
    try:
        result = train(config)
    finally:
        loop.TrainProgress.update, loop.collate_batch = original_update, original_collate
    if len(gate.ends) != total_steps or not torch.equal(torch.cat(seen[:total_steps]),
                                                        torch.tensor(inputs)):
        raise RuntimeError("tformer's loop did not read the windows given to HF")
    tokens = config.train.max_tokens // config.data.block_size * config.data.block_size
    if result.state.tokens_seen != tokens * total_steps:
        raise RuntimeError(f"the loop counted {result.state.tokens_seen} tokens")
    return Measured("tformer gpt2 preset, tformer.training.train()"
                    + (", train.compile" if compile_ else ""),
                    sum(p.numel() for p in result.model.parameters()), tokens,
                    gate.step_seconds(warmup), {})


# --- Hugging Face -----------------------------------------------------------------------------


def gpt2_model(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=128, n_layer=4, n_head=4,
                        n_inner=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def run_hf(gate: Gate, workdir: Path, total_steps: int, warmup: int, inputs: list,
           targets: list, vocab_size: int, batch_size: int) -> Measured:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            gate.step_end()

    model = gpt2_model(vocab_size)
    # shift_labels: the targets as they are (GPT-2's loss would otherwise shift labels itself)
    dataset = Dataset.from_dict({"input_ids": inputs, "labels": targets,
                                 "shift_labels": targets})
    args = TrainingArguments(
        output_dir=str(workdir / "hf"), max_steps=total_steps,
        per_device_train_batch_size=batch_size, learning_rate=1e-3, adam_beta1=0.9,
        adam_beta2=0.99, adam_epsilon=1e-8, weight_decay=0.1, lr_scheduler_type="cosine",
        warmup_steps=100, max_grad_norm=1.0, train_sampling_strategy="sequential",
        remove_unused_columns=False, logging_steps=10, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available(), seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=default_data_collator, callbacks=[Clock()])
    output = trainer.train()
    if len(gate.ends) != total_steps:
        raise RuntimeError(f"expected {total_steps} steps, saw {len(gate.ends)}")
    return Measured("HF GPT2LMHeadModel, Trainer", sum(p.numel() for p in model.parameters()),
                    batch_size * len(inputs[0]), gate.step_seconds(warmup),
                    {"mean_loss": output.training_loss,
                     "attn_implementation": model.config._attn_implementation})


# --- profiling --------------------------------------------------------------------------------


def best_time(fn) -> float:
    """The fastest of 5 timed calls (bench/lockstep.py's best_time)."""
    return _best_of(fn, reps=5)



def profile(workdir: Path, steps: int) -> None:
    """Where a step of tformer's loop goes: cProfile over ``steps`` steps of train() (the loop's
    Python), then the pieces of a step timed one by one, and the same batch through GPT-2."""
    import tformer.training.loop as loop
    from tformer.training import train
    from tformer.training.setup import build_optimizer
    from tformer.training.validation import forward_loss

    config = tformer_config(workdir / "profile", steps, 10)
    times: list[float] = []
    original_update = loop.TrainProgress.update

    def update(self, step, seconds):
        original_update(self, step, seconds)
        times.append(time.perf_counter())

    loop.TrainProgress.update = update
    profiler = cProfile.Profile()
    try:
        result = profiler.runcall(train, config)
    finally:
        loop.TrainProgress.update = original_update
    loop_seconds = times[-1] - times[0]
    print(f"\n## profile: train(), {steps} steps under cProfile, "
          f"{1000 * loop_seconds / (steps - 1):.1f} ms/step (profiler overhead included); "
          "functions by cumulative time:")
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(30)

    model, tokenizer = result.model.train(), result.tokenizer
    optimizer = build_optimizer(model, config)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, len(tokenizer), (12, 64), generator=g),
             "labels": torch.randint(0, len(tokenizer), (12, 64), generator=g)}
    gpt2 = gpt2_model(len(tokenizer)).train()

    def fwd_bwd(m=model):
        m.zero_grad(set_to_none=True)
        forward_loss(m, batch, 0.0).backward()

    def gpt2_fwd_bwd():
        gpt2.zero_grad(set_to_none=True)
        gpt2(input_ids=batch["input_ids"], labels=batch["labels"],
             shift_labels=batch["labels"]).loss.backward()

    def step():
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    rows = [("step: fwd+bwd, clip, AdamW", best_time(step)),
            ("  forward + loss", best_time(lambda: forward_loss(model, batch, 0.0))),
            ("  forward + loss + backward", best_time(fwd_bwd))]
    fwd_bwd()
    rows += [("  clip_grad_norm_", best_time(
                 lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))),
             ("  AdamW step (default, per-tensor)", best_time(optimizer.step))]
    for options in (dict(foreach=True), dict(fused=True)):
        alt = torch.optim.AdamW(build_optimizer(model, config).param_groups, **options)
        rows.append((f"  AdamW step {options}", best_time(alt.step)))
    rows.append(("GPT-2 forward + loss + backward, same batch", best_time(gpt2_fwd_bwd)))
    for name, seconds in rows:
        print(f"  {name:<48} {seconds * 1000:7.2f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                    max_name_column_width=40))


# --- report -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side")
    parser.add_argument("--log-every", type=int, default=10, help="tformer's train.log_every")
    parser.add_argument("--compile", action="store_true",
                        help="tformer with train.compile=true (torch.compile of the step)")
    parser.add_argument("--profile", action="store_true", help="also profile tformer's loop")
    parser.add_argument("--profile-only", action="store_true", help="only the profile")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the sides
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    total = args.warmup + args.steps
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s) per side; load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tformer-lm-bench-") as tmp:
        workdir = Path(tmp)
        if args.profile_only:
            profile(workdir, 60)
            return
        start = time.perf_counter()
        config = tformer_config(workdir / "windows", total, args.log_every)
        inputs, targets, vocab = run_windows(config, workdir / "windows", total)
        batch_size = config.train.max_tokens // config.data.block_size
        common = dict(workdir=workdir, total_steps=total, warmup=args.warmup, inputs=inputs,
                      targets=targets)
        ours, hf = run_lockstep([
            (run_tformer, dict(common, log_every=args.log_every, compile_=args.compile)),
            (run_hf, dict(common, vocab_size=vocab, batch_size=batch_size)),
        ], total)
        print(f"\nwindows: {batch_size} x {config.data.block_size} tokens a step, vocabulary "
              f"{vocab}; GPT-2 attention: {hf.notes['attn_implementation']}")
        print("\n| model, training | params | ms/step (mean) | ms/step (median) | tokens/s |")
        print("|---|---:|---:|---:|---:|")
        for m in (ours, hf):
            print(f"| {m.name} | {m.params / 1e6:.3f}M | {m.ms_per_step:.1f} | "
                  f"{1000 * statistics.median(m.step_seconds):.1f} | {m.tokens_per_s:,.0f} |")
        median = statistics.median(hf.step_seconds) / statistics.median(ours.step_seconds)
        print(f"\n**ratio tformer/HF (tokens/s): {ours.tokens_per_s / hf.tokens_per_s:.2f}x** "
              f"(of the median steps: {median:.2f}x)")
        print(f"timed: {args.steps} steps per side after {args.warmup} untimed, in lock-step; "
              f"load average now {os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s")
        if args.profile:
            profile(workdir, 60)


if __name__ == "__main__":
    main()
