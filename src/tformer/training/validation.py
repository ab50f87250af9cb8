"""Validation during training: the loss over the whole validation split and the recipe's
metric (``train.metric``) on generated outputs of a capped sample; for a language model
(``data.task: lm``), the loss and perplexity over every validation token, the best checkpoint
being the lowest loss, and a few samples; for an instruction-tuned one (``sft``), the loss and
perplexity on the validation responses and the metric on responses generated from the
rendered prompts. The one loss of training and validation is
`forward_loss` (``tformer.model.compute_loss``). Scoring a finished checkpoint on the test
split is not done here: see `tformer.training.finish` (through `tformer.evaluation`)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tformer.data import Seq2SeqCollator, TokenBudgetBatchSampler
from tformer.data.sft import PackedCollator, Rows, chat_prompts, pack_rows, row_batches
from tformer.evaluation import causal_lm_loss, stream_loss
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


def batch_tokens(batch: dict) -> int:
    """The tokens a training batch holds: its non-pad source and target tokens; a language
    model's, its targets (its inputs are the same tokens, one position earlier)."""
    targets = int((batch["labels"] != -100).sum())
    return targets + int(batch["attention_mask"].sum()) if "attention_mask" in batch else targets


def forward_loss(model, batch: dict, label_smoothing: float) -> torch.Tensor:
    """The one loss of training and validation (``tformer.model.compute_loss``); a batch
    without decoder inputs is a language model's (`tformer.evaluation.causal_lm_loss`)."""
    if "decoder_input_ids" not in batch:
        return causal_lm_loss(model, batch, label_smoothing)
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"], use_cache=False,
    )
    return compute_loss(out.logits, batch["labels"], label_smoothing)


@torch.no_grad()
def validation_loss(model, collate, tokens, batches, accelerator: Accelerator) -> float:
    """Token-mean cross-entropy (no smoothing) over the whole validation split, read in
    ``batches`` (lists of indices of ``tokens``)."""
    total, count = 0.0, 0
    for indices in batches:
        batch = collate_batch(collate, tokens, indices, accelerator)
        with accelerator.autocast():
            loss = forward_loss(model, batch, 0.0)
        n = int((batch["labels"] != -100).sum())
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


def maybe_evaluate(model, tokenizer, data: RunData, config: Config, state: TrainState,
                   accelerator: Accelerator, logger: MetricsLogger) -> bool:
    """Validation loss and the generation metric on a capped sample (a language model: the
    loss, perplexity and samples); True if the metric (the loss) improved. Runs on the main
    process; the others wait."""
    t = config.train
    improved = False
    unwrapped = full_model(model, accelerator)  # every process: FSDP gathers the weights
    if accelerator.is_main_process:
        unwrapped.eval()
        if config.data.task == "lm":
            record, name, higher_is_better = _lm_record(unwrapped, tokenizer, data, config,
                                                        accelerator), "loss", False
        elif config.data.task == "sft":
            record, name, higher_is_better = _sft_record(unwrapped, tokenizer, data, config,
                                                         accelerator), t.metric, True
        else:
            record, name, higher_is_better = _seq2seq_record(unwrapped, tokenizer, data, config,
                                                             accelerator), t.metric, True
        value = record[name]
        best = state.best_metric
        if best is None or (value > best if higher_is_better else value < best):
            state.best_metric, state.best_step = value, state.step
            state.evals_without_improvement = 0
            improved = True
        else:
            state.evals_without_improvement += 1
        logger.log("validation", state.step, record)
        other = "perplexity" if name == "loss" else name
        log.info("step %d: validation loss %.4f, %s %.4g (best %s %.4g at step %d)", state.step,
                 record["loss"], other, record[other], name, state.best_metric, state.best_step)
        unwrapped.train()
    # every process needs the same early-stopping decision and best step
    shared = [state.best_metric, state.best_step, state.evals_without_improvement, improved]
    if accelerator.num_processes > 1:
        shared = broadcast_object_list(shared)
    state.best_metric, state.best_step, state.evals_without_improvement, improved = shared
    return improved


def _seq2seq_record(model, tokenizer, data: RunData, config: Config,
                    accelerator: Accelerator) -> dict[str, Any]:
    """Validation loss, and ``train.metric`` on outputs generated for a capped sample."""
    tokens = data.tokens["validation"]
    collate = Seq2SeqCollator(tokenizer.pad_token_id, model.config.decoder_start_token_id)
    batches = TokenBudgetBatchSampler(*token_lengths(tokens), max_tokens=config.train.max_tokens,
                                      shuffle=False).batches(0)
    record: dict[str, Any] = {
        "loss": validation_loss(model, collate, tokens, batches, accelerator)}
    return _generation_metric(record, model, tokenizer, data, config, accelerator,
                              config.data.max_source_length)


def _sft_record(model, tokenizer, data: RunData, config: Config,
                accelerator: Accelerator) -> dict[str, Any]:
    """The loss and perplexity on the validation responses (packed rows, in order), and
    ``train.metric`` on responses generated greedily from the rendered prompts of a sample."""
    d = config.data
    inputs, labels = data.tokens["validation"]
    rows = pack_rows([len(x) for x in inputs], d.block_size, range(len(inputs)))
    loss = validation_loss(model, PackedCollator(tokenizer.pad_token_id),
                           (Rows(inputs), Rows(labels)),
                           row_batches(rows, config.train.max_tokens // d.block_size),
                           accelerator)
    record: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss)}
    return _generation_metric(record, model, tokenizer, data, config, accelerator,
                              d.block_size, prompt=lambda texts: chat_prompts(tokenizer, texts))


def _generation_metric(record: dict[str, Any], model, tokenizer, data: RunData, config: Config,
                       accelerator: Accelerator, max_source_length: int,
                       prompt=list) -> dict[str, Any]:
    """``record`` with ``train.metric`` of the outputs generated for the first
    ``train.eval_max_examples`` validation sources (``prompt`` renders them), and samples."""
    t = config.train
    sample = data.texts["validation"].select(
        range(min(t.eval_max_examples, len(data.texts["validation"])))
    )
    with accelerator.autocast():
        predictions = generate_texts(
            model, tokenizer, prompt(sample["source"]), max_source_length=max_source_length,
            **t.generation_options(),
        )
    record[t.metric] = score(t.metric, predictions, sample["target"])
    record["samples"] = [
        {"source": s[:300], "reference": r, "prediction": p}
        for s, r, p in list(zip(sample["source"], sample["target"], predictions))[:5]
    ]
    return record


#: Samples of a language model at each validation: ``train.max_new_tokens`` tokens sampled
#: (top-k) after each prompt: nothing (the start of a document) and the first line of the
#: validation text, the random draws from their own seeded generator.
SAMPLE_TOP_K = 40


def _lm_record(model, tokenizer, data: RunData, config: Config,
               accelerator: Accelerator) -> dict[str, Any]:
    """The loss and perplexity over every validation token (`stream_loss`), and samples."""
    t = config.train
    loss, tokens = stream_loss(model, data.tokens["validation"], config.data.block_size,
                               t.max_tokens, accelerator.device, accelerator.autocast)
    record: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
    first = data.texts["validation"][0]["text"]
    line = first.split("\n", 1)[0][:80]
    prompts = ["", line]
    # forked: the samples must not move the training's random state (exact resume holds
    # either way, but a run's dropout then does not depend on its evaluations)
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda"
                               else []):
        torch.manual_seed(t.seed)
        with accelerator.autocast():
            outputs = generate_texts(model, tokenizer, prompts, max_new_tokens=t.max_new_tokens,
                                     do_sample=True, top_k=SAMPLE_TOP_K)
    record["samples"] = [{"source": p, "reference": first[len(p):][:300] if p else "",
                          "prediction": o} for p, o in zip(prompts, outputs)]
    return record
