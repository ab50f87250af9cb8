"""The training loop, on Hugging Face Accelerate: the same code on one CPU, one GPU, several
GPUs or machines (``accelerate launch`` / ``torchrun``: DDP; FSDP and DeepSpeed through
accelerate config files).

Read :func:`train` first: it is the table of contents. What it does: claim the run directory,
build the data and the model, train, validate, save checkpoints (exact resume), log
``metrics.jsonl`` and write ``summary.json``. What it does not: test evaluation, the LoRA merge,
the loss plot and the report. Those read the finished run and belong to the callers:
`tformer.recipe.run_recipe` (``tformer train``) runs them all, `tformer.training.finish` the
first two. A run from `train` alone is complete and resumable, and its checkpoints load
(`tformer.load` merges an unmerged LoRA adapter as it loads).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from datasets import Dataset

from tformer.training.adapter import FullModel, trained_weights
from tformer.training.checkpoint import (
    TrainState,
    load_trainer_state,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    temporary_dir,
)
from tformer.training.config import Config
from tformer.training.distributed import (
    after_prepare,
    check_same_sharding,
    full_model,
    load_sharded_state,
    save_sharded_state,
    setup_deepspeed,
    shards_state,
)
from tformer.training.log import MetricsLogger, Window
from tformer.training.progress import TrainProgress
from tformer.training.rundir import claim_run_dir, drop_metrics_after, record_data_files, resume_point
from tformer.training.schedule import lr_factor
from tformer.training.setup import (
    build_model,
    build_optimizer,
    get_tokenizer,
    load_texts,
    make_train_split,
    micro_batches,
    resolve_precision,
    sharer,
    tokenize_splits,
)
from tformer.training.stopping import (
    InterruptFlag,
    RunClock,
    TimeHorizon,
    TrainingError,
    patience_exhausted,
)
from tformer.training.validation import batch_tokens, collate_batch, forward_loss, maybe_evaluate

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "TrainingError", "micro_batches", "resolve_precision", "train"]


@dataclass
class TrainResult:
    """What a run hands its caller (`tformer.training.finish`, the report) besides its
    directory."""

    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    state: TrainState
    stopped_by: str  # "max_steps", "early_stopping", "time_limit", "interrupted"
    model: Any = None  # the trained model (unwrapped), in memory
    tokenizer: Any = None
    test: Dataset | None = None  # the test split's texts (source, target), if the run has one
    device: str = "cpu"
    main_process: bool = True  # False on the other processes of a distributed run


def train(config: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train the model described by ``config``; with ``resume`` continue the run found in
    ``train.output_dir`` exactly where its last checkpoint left it. The run holds the
    directory's lock throughout (`tformer.training.rundir`); a run without ``resume`` refuses a
    directory holding another run's work, unless ``overwrite`` (delete that work first)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in train.output_dir and --overwrite deletes "
                         "it: give one of them")
    t = config.train
    precision = resolve_precision(t.precision, config)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=t.grad_accum,
        # Without cpu=True, accelerate 1.15 ignores torchrun's WORLD_SIZE on a CPU-only
        # machine and every process trains alone (measured); with it, DDP over gloo (or
        # DeepSpeed on that group, which setup_deepspeed enters).
        cpu=not torch.cuda.is_available(),
    )
    setup_deepspeed(accelerator, precision, t.grad_accum, t.clip_grad_norm)
    lock = claim_run_dir(Path(t.output_dir), resume, overwrite, accelerator)
    try:
        return _train(config, resume, accelerator)
    finally:
        if lock is not None:
            lock.release()


def _train(config: Config, resume: bool, accelerator: Accelerator) -> TrainResult:
    t = config.train
    run_dir = Path(t.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume_from = resume_point(run_dir, ckpt_dir, config) if resume else None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
        record_data_files(run_dir, config)
    accelerator.wait_for_everyone()
    set_seed(t.seed)

    texts, stats = load_texts(config)
    tokenizer = get_tokenizer(config, run_dir, texts["train"], accelerator.is_main_process)
    data = tokenize_splits(config, texts, tokenizer)
    data.stats.update(stats)
    weights = trained_weights(config)  # all of the model's, or a LoRA adapter's
    model = weights.wrap(build_model(config, tokenizer))
    optimizer = build_optimizer(model, config)
    state = TrainState()  # replaced by the checkpoint's on resume; the schedule reads it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, t.warmup_steps, t.schedule, state.schedule_steps or t.max_steps, t.min_lr_ratio,
        start=state.schedule_from))
    model, optimizer = accelerator.prepare(model, optimizer)
    after_prepare(model, accelerator)  # FSDP2 (tformer.training.distributed)
    train_split = make_train_split(config, data, tokenizer, accelerator.unwrap_model(model).config,
                                   sharer(accelerator), accelerator.is_main_process)
    data.stats.update(train_split.stats())
    log.info("data: %s", {k: v for k, v in data.stats.items() if "lengths" not in k})

    if resume_from is not None:
        state = _restore(resume_from, accelerator, model, optimizer, scheduler, weights)
        log.info("resumed from %s at step %d", resume_from, state.step)
    if resume and accelerator.is_main_process:  # each step logged once (a crash logs past it)
        drop_metrics_after(run_dir / "metrics.jsonl", state.step)
    if accelerator.is_main_process:
        (run_dir / "data_stats.json").write_text(json.dumps(data.stats))

    def save(is_best: bool) -> Path:
        clock.sync()  # the checkpoint holds the clock to the second
        return maybe_save(ckpt_dir, model, tokenizer, optimizer, scheduler, state, accelerator,
                          config, is_best, weights)

    logger = MetricsLogger(run_dir, accelerator.is_main_process)
    stopped_by = "max_steps"
    last_ckpt = resume_from
    interrupted = InterruptFlag()
    batches = micro_batches(train_split, state, accelerator.num_processes,
                            accelerator.process_index)
    progress = TrainProgress(t.max_steps, t.max_minutes, state, accelerator.is_main_process)
    window = Window(state, t.clip_grad_norm)
    clock = RunClock()
    horizon = TimeHorizon(clock, t.warmup_steps, t.max_minutes, t.decay_over == "time")
    train_loss = _compiled(forward_loss, t.compile, accelerator)
    clock.start(state)
    model.train()
    try:
        while state.step < t.max_steps:
            loss_value = 0.0
            for _ in range(t.grad_accum):
                indices = next(batches)  # state.epoch is now this batch's epoch
                batch = collate_batch(train_split.collate, train_split.tokens(state.epoch), indices,
                                      accelerator)
                with accelerator.accumulate(model):
                    loss = train_loss(model, batch, t.label_smoothing)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.clip_grad_norm:
                        # under DeepSpeed this only reads the norm: its engine clipped already
                        window.add_grad_norm(
                            accelerator.clip_grad_norm_(model.parameters(), t.clip_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += accelerator.num_processes
                window.tokens += batch_tokens(batch)
                loss_value += loss.item() / t.grad_accum
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss is {loss_value} at step {state.step + 1}; stopping. The last good "
                    f"checkpoint is {last_ckpt or 'none (no checkpoint written yet)'}. "
                    "Try a lower train.lr, train.precision=fp32 or train.clip_grad_norm=1.0."
                )
            horizon.observe(state.step + 1, state, accelerator)  # decay_over: time, first
            scheduler.step()
            state.step += 1
            window.add(loss_value)
            progress.update(state.step, clock.seconds())
            out_of_time = False
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                record = window.flush(accelerator, scheduler.get_last_lr()[0])
                logger.log("train", state.step, record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
                out_of_time = _out_of_time(clock, t.max_minutes, accelerator)
                horizon.replan(state, accelerator)  # decay_over: time, every tenth of it
            if state.step % t.eval_every == 0 or state.step == t.max_steps or out_of_time:
                improved = maybe_evaluate(model, tokenizer, data, config, state, accelerator,
                                          logger)
                last_ckpt = save(improved)
                if patience_exhausted(state, t.early_stopping_patience):
                    stopped_by = "early_stopping"
                    break
                if out_of_time:
                    stopped_by = "time_limit"
                    break
            elif t.save_every and state.step % t.save_every == 0:
                last_ckpt = save(False)
            if interrupted.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        if state.step > 0:
            last_ckpt = save(False)
            log.warning("interrupted at step %d; saved %s (resume with --resume)", state.step,
                        last_ckpt)
    finally:
        clock.sync()
        interrupted.restore()
        progress.close()
        logger.close()
    best = ckpt_dir / _step_name(state.best_step) if state.best_step else last_ckpt
    if accelerator.is_main_process:
        _write_summary(run_dir, state, best, last_ckpt, stopped_by)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, best, last_ckpt, state, stopped_by,
                       accelerator.unwrap_model(model), tokenizer, data.texts.get("test"),
                       str(accelerator.device), accelerator.is_main_process)


# --- the pieces, in the order train() uses them -------------------------------------------


def _compiled(loss_fn, compile_: bool, accelerator: Accelerator):
    """Only the training step is compiled: validation runs in eval mode (no dropout) and
    generation in other shapes, and each would be a compilation of its own. dynamic=True:
    token-budget batches change shape at every step."""
    if compile_ and accelerator.num_processes > 1:
        log.warning("train.compile is tested in one process only; under %s the model's "
                    "wrapper may split the graph or recompile (docs/usage.md, 'Compiling')",
                    accelerator.distributed_type)
    return torch.compile(loss_fn, dynamic=True) if compile_ else loss_fn


def _out_of_time(clock: RunClock, max_minutes: float | None, accelerator: Accelerator) -> bool:
    """``train.max_minutes`` spent (process 0's clock, so that every process stops at once)."""
    if max_minutes is None:
        return False
    spent = clock.seconds() > 60 * max_minutes
    return _broadcast([spent], accelerator)[0]


def maybe_save(ckpt_dir: Path, model, tokenizer, optimizer, scheduler, state: TrainState,
               accelerator: Accelerator, config: Config, is_best: bool,
               weights: FullModel) -> Path:
    """Write a checkpoint (main process), keep the last N and the best."""
    path = ckpt_dir / _step_name(state.step)
    # every process's RNG (dropout differs per process), so each resumes with its own
    rngs = [rng_state()]
    if accelerator.num_processes > 1:
        rngs = gather_object(rngs)
    whole = full_model(model, accelerator)  # every process: FSDP gathers the weights
    sharded = shards_state(accelerator)
    if sharded:  # the model and optimizer shards in CKPT/accelerate/, every process
        save_sharded_state(accelerator, temporary_dir(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainer_state = {
            "scheduler": scheduler.state_dict(),
            "rng": rngs,  # one per process, by process index
        }
        if not sharded:
            trainer_state["optimizer"] = optimizer.state_dict()
        if accelerator.scaler is not None:
            trainer_state["scaler"] = accelerator.scaler.state_dict()
        to_save = weights.to_save(whole)
        if path.name not in state.checkpoints:
            state.checkpoints.append(path.name)
        save_checkpoint(path, to_save, tokenizer, trainer_state, state, started=sharded)
        keep = {ckpt_dir / _step_name(state.best_step)} if state.best_step else set()
        prune_checkpoints(ckpt_dir, config.train.keep_last, keep, owned=state.checkpoints)
        state.checkpoints = [name for name in state.checkpoints if (ckpt_dir / name).is_dir()]
    accelerator.wait_for_everyone()
    return path


def _restore(path: Path, accelerator, model, optimizer, scheduler,
             weights: FullModel) -> TrainState:
    trainer_state, state = load_trainer_state(path)
    check_same_sharding(path, trainer_state, accelerator)
    if shards_state(accelerator):  # model and optimizer, every process
        load_sharded_state(accelerator, path)
    else:
        weights.restore(accelerator.unwrap_model(model), path)
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


def _step_name(step: int) -> str:
    return f"step-{step:07d}"


def _broadcast(values: list, accelerator: Accelerator) -> list:
    if accelerator.num_processes == 1:
        return values
    return broadcast_object_list(values)


def _write_summary(run_dir: Path, state: TrainState, best, last, stopped_by: str) -> None:
    summary = {"state": asdict(state), "best_checkpoint": str(best) if best else None,
               "last_checkpoint": str(last) if last else None, "stopped_by": stopped_by}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


