"""Validation during training: the loss over the whole validation split and the recipe's
metric (``train.metric``) on generated outputs of a capped sample. The one loss of training and
validation is `forward_loss` (``tformer.model.compute_loss``). Scoring a finished checkpoint on
the test split is not done here: see `tformer.training.finish` (through
`tformer.evaluation`)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tformer.data import Seq2SeqCollator, TokenBudgetBatchSampler
from tformer.generation import generate_texts
from tformer.metrics import score
from tformer.model import compute_loss
from tformer.training.checkpoint import TrainState
from tformer.training.config import Config
from tformer.training.distributed import full_model
from tformer.training.log import MetricsLogger
from tformer.training.setup import RunData, token_lengths

log = logging.getLogger(__name__)


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
    unwrapped = full_model(model, accelerator)  # every process: FSDP gathers the weights
    if accelerator.is_main_process:
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
                unwrapped, tokenizer, sample["source"],
                max_source_length=config.data.max_source_length, **t.generation_options(),
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
    if accelerator.num_processes > 1:
        shared = broadcast_object_list(shared)
    state.best_metric, state.best_step, state.evals_without_improvement, improved = shared
    return improved
