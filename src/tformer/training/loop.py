"""The training loop, on Hugging Face Accelerate: the same code on one CPU, one GPU, several
GPUs or machines (``accelerate launch`` / ``torchrun``: DDP; FSDP and DeepSpeed through
accelerate config files).

Read :func:`train` first: it is the table of contents.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from tformer.data import Seq2SeqCollator, TokenBudgetBatchSampler, padding_fraction
from tformer.generation import generate_texts
from tformer.lora import (
    ADAPTER_DIR,
    LoraCheckpoint,
    is_lora,
    load_adapter_state,
    merge_adapter,
)
from tformer.metrics import score
from tformer.model import compute_loss
from tformer.training.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tformer.training.config import Config
from tformer.training.progress import TrainProgress
from tformer.training.schedule import lr_factor
from tformer.training.setup import (
    RunData,
    TrainSplit,
    build_model,
    get_tokenizer,
    load_texts,
    token_lengths,
    tokenize_splits,
)

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is intact."""


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    state: TrainState
    stopped_by: str  # "max_steps", "early_stopping", "time_limit", "interrupted"
    model: Any = None  # the trained model (unwrapped), in memory
    tokenizer: Any = None


def train(config: Config, resume: bool = False) -> TrainResult:
    """Train the model described by ``config``; with ``resume`` continue the run found in
    ``train.output_dir`` exactly where its last checkpoint left it."""
    t = config.train
    run_dir = Path(t.output_dir)
    accelerator = Accelerator(
        mixed_precision=resolve_precision(t.precision, config),
        gradient_accumulation_steps=t.grad_accum,
        # Without cpu=True, accelerate 1.15 ignores torchrun's WORLD_SIZE on a CPU-only
        # machine and every process trains alone (measured); with it, DDP over gloo.
        cpu=not torch.cuda.is_available(),
    )
    ckpt_dir = run_dir / "checkpoints"
    resume_from = _resume_point(run_dir, ckpt_dir, config) if resume else None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    set_seed(t.seed)

    texts, stats = load_texts(config)
    tokenizer = get_tokenizer(config, run_dir, texts["train"], accelerator.is_main_process)
    data = tokenize_splits(config, texts, tokenizer)
    data.stats.update(stats)
    model = build_model(config, tokenizer)
    optimizer = build_optimizer(model, config)
    clock = _RunClock()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.schedule, t.max_steps, t.min_lr_ratio,
                                       progress=_time_progress(clock, t))
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    train_split = TrainSplit(config, data, tokenizer, _sharer(accelerator),
                             accelerator.is_main_process)
    collate = Seq2SeqCollator(tokenizer.pad_token_id, _decoder_start(model, accelerator))
    data.stats["padding_fraction"] = padding_fraction(
        train_split.sampler.batches(0), *token_lengths(data.tokens["train"])
    )
    log.info("data: %s", {k: v for k, v in data.stats.items() if "lengths" not in k})

    state = TrainState()
    if resume_from is not None:
        state = _restore(resume_from, accelerator, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, state.step)
    if accelerator.is_main_process:
        (run_dir / "data_stats.json").write_text(json.dumps(data.stats))

    logger = MetricsLogger(run_dir, accelerator.is_main_process)
    stopped_by = "max_steps"
    last_ckpt = resume_from
    interrupted = _InterruptFlag()
    batches = micro_batches(train_split, state, accelerator.num_processes,
                            accelerator.process_index)
    progress = TrainProgress(t.max_steps, t.max_minutes, state, accelerator.is_main_process)
    window = _Window(state, t.clip_grad_norm)
    # Only the training step is compiled: validation runs in eval mode (no dropout) and
    # generation in other shapes, and each would be a compilation of its own. dynamic=True:
    # token-budget batches change shape at every step.
    train_loss = torch.compile(forward_loss, dynamic=True) if t.compile else forward_loss
    if t.compile and accelerator.num_processes > 1:
        log.warning("train.compile is tested in one process only; under %s the model's "
                    "wrapper may split the graph or recompile (docs/usage.md, 'Compiling')",
                    accelerator.distributed_type)
    clock.start(state)
    model.train()
    try:
        while state.step < t.max_steps:
            loss_value = 0.0
            for _ in range(t.grad_accum):
                indices = next(batches)  # state.epoch is now this batch's epoch
                batch = collate_batch(collate, train_split.tokens(state.epoch), indices, accelerator)
                with accelerator.accumulate(model):
                    loss = train_loss(model, batch, t.label_smoothing)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.clip_grad_norm:
                        window.add_grad_norm(
                            accelerator.clip_grad_norm_(model.parameters(), t.clip_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += accelerator.num_processes
                window.tokens += int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
                loss_value += loss.item() / t.grad_accum
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss is {loss_value} at step {state.step + 1}; stopping. The last good "
                    f"checkpoint is {last_ckpt or 'none (no checkpoint written yet)'}. "
                    "Try a lower train.lr, train.precision=fp32 or train.clip_grad_norm=1.0."
                )
            if t.decay_over == "time":
                clock.progress = _broadcast([clock.seconds() / (60 * t.max_minutes)],
                                            accelerator)[0]
            scheduler.step()
            state.step += 1
            window.add(loss_value)
            progress.update(state.step, clock.seconds())
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                record = window.flush(accelerator, scheduler.get_last_lr()[0])
                logger.log("train", state.step, record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
            out_of_time = t.max_minutes is not None and _broadcast(
                [clock.seconds() > 60 * t.max_minutes], accelerator)[0]
            evaluated = state.step % t.eval_every == 0 or state.step == t.max_steps or out_of_time
            if evaluated:
                improved = maybe_evaluate(model, tokenizer, data, config, state, accelerator,
                                          logger)
                clock.sync()
                last_ckpt = maybe_save(ckpt_dir, model, tokenizer, optimizer, scheduler, state,
                                       accelerator, config, improved)
                if _patience_exhausted(state, t.early_stopping_patience):
                    stopped_by = "early_stopping"
                    break
                if out_of_time:
                    stopped_by = "time_limit"
                    break
            elif t.save_every and state.step % t.save_every == 0:
                clock.sync()
                last_ckpt = maybe_save(ckpt_dir, model, tokenizer, optimizer, scheduler, state,
                                       accelerator, config, False)
            if interrupted.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        if state.step > 0:
            clock.sync()
            last_ckpt = maybe_save(ckpt_dir, model, tokenizer, optimizer, scheduler, state,
                                   accelerator, config, False)
            log.warning("interrupted at step %d; saved %s (resume with --resume)", state.step,
                        last_ckpt)
    finally:
        clock.sync()
        interrupted.restore()
        progress.close()
        logger.close()
    best = ckpt_dir / _step_name(state.best_step) if state.best_step else last_ckpt
    if accelerator.is_main_process:
        if is_lora(accelerator.unwrap_model(model)) and t.merge_lora and stopped_by != "interrupted":
            for path in {p for p in (best, last_ckpt) if p is not None}:
                merge_lora_checkpoint(path, config, tokenizer)
        if "test" in data.texts and best is not None and stopped_by != "interrupted":
            evaluate_test(best, data, config, run_dir)
        _write_summary(run_dir, state, best, last_ckpt, stopped_by)
        from tformer.training.plots import plot_losses

        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        _write_report(run_dir, accelerator.device)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, best, last_ckpt, state, stopped_by,
                       accelerator.unwrap_model(model), tokenizer)


# --- the pieces, in the order train() uses them -------------------------------------------


def resolve_precision(precision: str, config: Config) -> str:
    """"auto": bf16 on a GPU that has it (fp16 with loss scaling otherwise, but never for T5,
    whose activations overflow fp16: fp32 then); fp32 on CPU.

    On a CPU without bf16 units (this project's AVX2 host) bf16 is emulated: matmuls ran at
    1.2 GFLOP/s against 121-142 in fp32, and a training step of the ``small`` model was 4-5x
    slower under autocast. On a host with AVX512-BF16 the ``small`` model's step was only
    1.04x faster under autocast (Hugging Face T5: 1.3-1.4x), and the Multi30k recipe's
    d_model-128 model slower (docs/benchmarks.md, "Training throughput"). So CPU runs default
    to fp32; ``train.precision=bf16`` asks for autocast anyway."""
    if precision == "fp16" and _overflows_fp16(config):
        log.warning("train.precision=fp16 with a T5-family model: T5's activations overflow "
                    "fp16 (inf/NaN loss). Use train.precision=bf16 (or fp32).")
    if precision != "auto":
        return {"fp32": "no"}.get(precision, precision)
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16"
        if _overflows_fp16(config):
            log.info("precision auto: no bf16 on this GPU, and T5 overflows fp16: fp32")
            return "no"
        return "fp16"
    return "no"


def _overflows_fp16(config: Config) -> bool:
    """T5-family checkpoints overflow fp16 (feed-forward activations beyond 65504)."""
    from tformer.training.setup import pretrained_model_type

    return pretrained_model_type(config) in ("t5", "mt5", "umt5", "longt5", "switch_transformers")


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (decaying them only hurts)."""
    t = config.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "shared" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps)


def micro_batches(sampler: TrainSplit, state: TrainState, world: int, rank: int):
    """This process's batches, forever, epoch after epoch, from ``state``'s position.

    Every process computes the same global batch order from (seed, epoch; with
    ``data.bpe_dropout``, also the main process's encoding of that epoch, which every process
    receives) and takes every ``world``-th batch: processes see different batches, and the
    position in the data is one number (global batches consumed) that survives a resume. The
    epoch's last ``len % world`` batches are dropped so all processes take the same number of
    steps.
    """
    while True:
        order = sampler.batches(state.epoch)
        usable = len(order) - len(order) % world
        if usable == 0:
            raise TrainingError(
                f"the training split gives {len(order)} batch(es) for {world} process(es); "
                "lower train.max_tokens or add data"
            )
        for position in range(state.batches_in_epoch + rank, usable, world):
            yield order[position]
        state.epoch += 1
        state.batches_in_epoch = 0


def _sharer(accelerator: Accelerator):
    """The main process's object, on every process (``data.bpe_dropout``'s epoch encodings)."""
    if accelerator.num_processes == 1:
        return lambda obj: obj
    return lambda obj: broadcast_object_list([obj], from_process=0)[0]


def collate_batch(collate, tokens, indices: list[int], accelerator: Accelerator) -> dict:
    sources, labels = tokens
    features = [{"input_ids": sources[i], "labels": labels[i]} for i in indices]
    return {k: v.to(accelerator.device) for k, v in collate(features).items()}


def forward_loss(model, batch: dict, label_smoothing: float) -> torch.Tensor:
    """The one loss of training and validation (``tformer.model.compute_loss``)."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"], use_cache=False,
    )
    return compute_loss(out.logits, batch["labels"], label_smoothing)


@torch.no_grad()
def validation_loss(model, collate, tokens, config: Config, accelerator: Accelerator) -> float:
    """Token-mean cross-entropy (no smoothing) over the whole validation split."""
    sampler = TokenBudgetBatchSampler(
        *token_lengths(tokens), max_tokens=config.train.max_tokens, shuffle=False
    )
    total, count = 0.0, 0
    for indices in sampler.batches(0):
        batch = collate_batch(collate, tokens, indices, accelerator)
        with accelerator.autocast():
            loss = forward_loss(model, batch, 0.0)
        n = int((batch["labels"] != -100).sum())
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


def maybe_evaluate(model, tokenizer, data: RunData, config: Config, state: TrainState,
                   accelerator: Accelerator, logger: MetricsLogger) -> bool:
    """Validation loss and the generation metric on a capped sample; True if the metric
    improved. Runs on the main process; the others wait."""
    t = config.train
    improved = False
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        collate = Seq2SeqCollator(tokenizer.pad_token_id, unwrapped.config.decoder_start_token_id)
        record: dict[str, Any] = {
            "loss": validation_loss(unwrapped, collate, data.tokens["validation"], config,
                                    accelerator)
        }
        sample = data.texts["validation"].select(
            range(min(t.eval_max_examples, len(data.texts["validation"])))
        )
        with accelerator.autocast():
            predictions = generate_texts(
                unwrapped, tokenizer, sample["source"], max_new_tokens=t.max_new_tokens,
                num_beams=t.num_beams, max_source_length=config.data.max_source_length,
            )
        record[t.metric] = score(t.metric, predictions, sample["target"])
        record["samples"] = [
            {"source": s[:300], "reference": r, "prediction": p}
            for s, r, p in list(zip(sample["source"], sample["target"], predictions))[:5]
        ]
        value = record[t.metric]
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step = value, state.step
            state.evals_without_improvement = 0
            improved = True
        else:
            state.evals_without_improvement += 1
        logger.log("validation", state.step, record)
        log.info("step %d: validation loss %.4f, %s %.2f (best %.2f at step %d)", state.step,
                 record["loss"], t.metric, value, state.best_metric, state.best_step)
        unwrapped.train()
    # every process needs the same early-stopping decision and best step
    shared = [state.best_metric, state.best_step, state.evals_without_improvement, improved]
    shared = _broadcast(shared, accelerator)
    state.best_metric, state.best_step, state.evals_without_improvement, improved = shared
    return improved


def evaluate_test(checkpoint: Path, data: RunData, config: Config, run_dir: Path) -> dict:
    """Score the best checkpoint on the whole test split: ``test_metrics.json`` and
    ``test_predictions.jsonl`` in the run directory."""
    from tformer.generation import load_model
    from tformer.metrics import all_metrics
    from tformer.tokenization import load_tokenizer

    t = config.train
    model = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    test = data.texts["test"]
    predictions = generate_texts(
        model, tokenizer, test["source"], max_new_tokens=t.max_new_tokens, num_beams=t.num_beams,
        max_source_length=config.data.max_source_length,
    )
    metrics = {"checkpoint": str(checkpoint), "examples": len(test), "num_beams": t.num_beams,
               **all_metrics(predictions, test["target"])}
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    with (run_dir / "test_predictions.jsonl").open("w", encoding="utf-8") as fh:
        for source, reference, prediction in zip(test["source"], test["target"], predictions):
            record = {"source": source, "reference": reference, "prediction": prediction}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    log.info("test (%d examples): ROUGE-L %.2f, BLEU %.2f", len(test), metrics["rougeL"],
             metrics["bleu"])
    return metrics


def maybe_save(ckpt_dir: Path, model, tokenizer, optimizer, scheduler, state: TrainState,
               accelerator: Accelerator, config: Config, is_best: bool) -> Path:
    """Write a checkpoint (main process), keep the last N and the best."""
    path = ckpt_dir / _step_name(state.step)
    # every process's RNG (dropout differs per process), so each resumes with its own
    rngs = [rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object(rngs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainer_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rngs,  # one per process, by process index
        }
        if accelerator.scaler is not None:
            trainer_state["scaler"] = accelerator.scaler.state_dict()
        to_save = accelerator.unwrap_model(model)
        if is_lora(to_save):  # the adapter only, in CKPT/adapter (see tformer.lora)
            to_save = LoraCheckpoint(to_save)
        save_checkpoint(path, to_save, tokenizer, trainer_state, state)
        keep = {ckpt_dir / _step_name(state.best_step)} if state.best_step else set()
        prune_checkpoints(ckpt_dir, config.train.keep_last, keep)
    accelerator.wait_for_everyone()
    return path


def _restore(path: Path, accelerator, model, optimizer, scheduler) -> TrainState:
    from safetensors.torch import load_file

    trainer_state, state = load_trainer_state(path)
    unwrapped = accelerator.unwrap_model(model)
    if is_lora(unwrapped):
        try:
            load_adapter_state(unwrapped, load_file(path / ADAPTER_DIR / "adapter_model.safetensors"))
        except (ValueError, FileNotFoundError) as error:
            raise TrainingError(f"{path}: {error}") from error
    else:
        weights = load_file(path / "model.safetensors")
        missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
        # save_pretrained writes one copy of tied weights; the model's own table names the
        # others (own model: tgt_embed; T5: encoder/decoder.embed_tokens and lm_head).
        tied = set(getattr(unwrapped, "all_tied_weights_keys", None) or {})
        if set(missing) - tied or unexpected:
            raise TrainingError(f"{path}: weights do not match the model "
                                f"(missing {sorted(set(missing) - tied)}, unexpected {unexpected})")
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    if accelerator.scaler is not None and "scaler" in trainer_state:
        accelerator.scaler.load_state_dict(trainer_state["scaler"])
    rngs = trainer_state["rng"]
    if len(rngs) != accelerator.num_processes:
        raise TrainingError(
            f"{path} was written by {len(rngs)} process(es); resume it with the same number "
            f"(this run has {accelerator.num_processes})"
        )
    set_rng_state(rngs[accelerator.process_index])
    return state


def merge_lora_checkpoint(path: Path, config: Config, tokenizer) -> None:
    """Rewrite a LoRA checkpoint with the adapter merged into a plain model directory at its
    top (the adapter and training state stay, so the run can still be resumed from it)."""
    import torch

    from tformer.generation import load_model

    trainer_state, state = load_trainer_state(path)
    adapter = path / ADAPTER_DIR
    merged = merge_adapter(load_model(config.model.pretrained, dtype=torch.float32), adapter)
    save_checkpoint(path, LoraCheckpoint(adapter, merged), tokenizer, trainer_state, state)
    log.info("merged the LoRA adapter into %s", path)


def _resume_point(run_dir: Path, ckpt_dir: Path, config: Config) -> Path | None:
    saved = run_dir / "config.yaml"
    if saved.is_file():
        from tformer.training.config import load_config

        previous = load_config(saved)
        if previous.model != config.model or previous.data != config.data:
            raise TrainingError(
                f"--resume: the model/data configuration differs from the one saved in {saved}; "
                "resume with the same recipe and overrides"
            )
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        log.warning("--resume: no complete checkpoint in %s; starting from scratch", ckpt_dir)
    return path


def _decoder_start(model, accelerator: Accelerator) -> int:
    config = accelerator.unwrap_model(model).config
    return config.decoder_start_token_id


def _patience_exhausted(state: TrainState, patience: int | None) -> bool:
    return patience is not None and state.evals_without_improvement >= patience


def _step_name(step: int) -> str:
    return f"step-{step:07d}"


def _broadcast(values: list, accelerator: Accelerator) -> list:
    if accelerator.num_processes == 1:
        return values
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(values)


def _write_report(run_dir: Path, device: torch.device) -> None:
    """``report.html`` (tformer.visualization.report); a failure is a warning, never the end of
    the run: its checkpoints and metrics are already on disk."""
    try:
        from tformer.visualization.report import write_report

        write_report(run_dir, device=str(device))
    except Exception as error:  # noqa: BLE001
        log.warning("could not write the report of %s: %s: %s", run_dir, type(error).__name__,
                    error)


def _write_summary(run_dir: Path, state: TrainState, best, last, stopped_by: str) -> None:
    summary = {"state": asdict(state), "best_checkpoint": str(best) if best else None,
               "last_checkpoint": str(last) if last else None, "stopped_by": stopped_by}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


class _RunClock:
    """Wall-clock seconds spent in the training loop, evaluations included, summed over resumes:
    the clock of ``max_minutes`` and of a schedule that decays over time. ``sync`` folds the
    time since the last sync into ``TrainState.elapsed_seconds``; the loop syncs right before
    every checkpoint, so a resumed run goes on from the very second its checkpoint was taken."""

    def __init__(self) -> None:
        self.state: TrainState | None = None
        self.mark = 0.0
        self.progress = 0.0  # fraction of the time budget, as of the last optimizer step

    def start(self, state: TrainState) -> None:
        self.state, self.mark = state, time.perf_counter()

    def seconds(self) -> float:
        if self.state is None:
            return 0.0
        return self.state.elapsed_seconds + time.perf_counter() - self.mark

    def sync(self) -> None:
        now = time.perf_counter()
        self.state.elapsed_seconds += now - self.mark
        self.mark = now


def _time_progress(clock: _RunClock, t) -> float | None:
    """Fraction of the time budget spent, for ``decay_over: time``; None otherwise. It is read
    once per step (``clock.progress``, set from process 0's clock under DDP) so that every
    replica applies the same learning rate."""
    if t.decay_over != "time":
        return None
    return clock.progress


class _Window:
    """Running figures between two log lines.

    With ``train.clip_grad_norm`` set, a record also carries ``grad_norm`` (the mean over the
    window of the gradient norm before clipping) and ``clipped`` (the share of those steps whose
    norm was above the limit, so were scaled down). The norms stay tensors until the log line:
    one host sync per line, not per step. Under DeepSpeed, which clips inside its own step,
    accelerate 1.15 hands back the engine's last recorded norm, so the previous step's (read
    in its source, not run here: DeepSpeed is not installed on the test machine), or none.
    """

    def __init__(self, state: TrainState, clip: float | None) -> None:
        self.state, self.losses, self.tokens, self.start = state, [], 0, time.perf_counter()
        self.clip, self.grad_norms = clip, []

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def add_grad_norm(self, norm: torch.Tensor | float | None) -> None:
        if norm is not None:
            self.grad_norms.append(torch.as_tensor(norm, dtype=torch.float32))

    def flush(self, accelerator: Accelerator, lr: float) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self.start
        tokens = self.tokens
        if accelerator.num_processes > 1:
            tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device),
                                            "sum"))
        self.state.tokens_seen += tokens
        record = {"loss": sum(self.losses) / max(len(self.losses), 1), "lr": lr,
                  "tokens_per_s": tokens / max(elapsed, 1e-9), "tokens_seen": self.state.tokens_seen}
        if self.grad_norms:
            norms = torch.stack(self.grad_norms)
            record["grad_norm"] = float(norms.mean())
            record["clipped"] = (norms > self.clip).sum().item() / len(norms)  # 0.88, not 0.8799...
        self.losses, self.tokens, self.start, self.grad_norms = [], 0, now, []
        return record


class MetricsLogger:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard."""

    def __init__(self, run_dir: Path, active: bool) -> None:
        self.active = active
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if active:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                log.info("tensorboard not installed: metrics.jsonl only")

    def log(self, split: str, step: int, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"split": split, "step": step, **record}, ensure_ascii=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _InterruptFlag:
    """SIGINT/SIGTERM finish the current step, then save and stop (a second one kills)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: finishing this step, then saving a checkpoint", signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
