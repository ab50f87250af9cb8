"""``tformer evaluate``: generate for an evaluation file and score against its references; for a
language model, its loss and perplexity on a text (`evaluate_text`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tformer.ct2.engine import CT2Seq2Seq
from tformer.data import CausalLMCollator, load_documents, load_eval_examples
from tformer.data.packing import eval_windows, pack_documents
from tformer.generation import Seq2Seq, max_source_length_of
from tformer.metrics import all_metrics
from tformer.model import IGNORE_INDEX, compute_loss

log = logging.getLogger(__name__)


def evaluate(
    generator: Seq2Seq | CT2Seq2Seq,
    data: str | Path,
    *,
    output_dir: str | Path | None = None,
    source_column: str = "source",
    target_column: str = "target",
    prefix: str = "",
    language: str = "auto",
    moses_lang: str | None = None,
    max_examples: int | None = None,
    **generation,
) -> dict:
    """Score ``generator`` on ``data`` (JSONL/CSV/TSV/Parquet; the target field holds a
    reference string or a list of them). Writes ``metrics.json`` and ``predictions.jsonl``
    into ``output_dir`` when given. ``moses_lang``: also BLEU on lowercased Moses-tokenised
    text (:func:`tformer.metrics.moses_bleu`). ``generation``: options of ``Seq2Seq.generate``."""
    examples = load_eval_examples(data, source_column=source_column,
                                  target_column=target_column, prefix=prefix)
    ids, sources, references = examples.ids, examples.sources, examples.references
    if max_examples is not None:
        ids, sources, references = ids[:max_examples], sources[:max_examples], references[:max_examples]
    return evaluate_examples(generator, ids, sources, references, data=str(data),
                             output_dir=output_dir, language=language, moses_lang=moses_lang,
                             **generation)


def evaluate_examples(
    generator: Seq2Seq | CT2Seq2Seq,
    ids: Sequence[str],
    sources: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    data: str = "",
    output_dir: str | Path | None = None,
    file_prefix: str = "",
    language: str = "auto",
    moses_lang: str | None = None,
    **generation,
) -> dict:
    """Generate for ``sources`` and score against ``references`` (one list per source): the
    core of :func:`evaluate`, also used for a run's test split (`tformer.training.finish`).
    With ``output_dir``: ``{file_prefix}metrics.json`` and ``{file_prefix}predictions.jsonl``
    there."""
    start = time.perf_counter()
    truncation: dict = {}
    if getattr(generator, "engine", "torch") == "torch":  # generate_texts reports truncation
        predictions = generator.generate(list(sources), report=truncation, **generation)
    else:
        predictions = generator.generate(list(sources), **generation)
    seconds = time.perf_counter() - start
    metrics = {
        "model": generator.path,
        "engine": getattr(generator, "engine", "torch"),
        "data": data,
        "examples": len(sources),
        "references_per_example": max(len(r) for r in references),
        "generation": generation,
        "generation_seconds": round(seconds, 2),
        **truncation,  # truncated_sources, max_source_length
        **all_metrics(predictions, [list(r) for r in references], language, moses_lang),
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{file_prefix}metrics.json").write_text(json.dumps(metrics, indent=2,
                                                              ensure_ascii=False))
        with (out / f"{file_prefix}predictions.jsonl").open("w", encoding="utf-8") as fh:
            for i, s, r, p in zip(ids, sources, references, predictions):
                record = {"id": i, "source": s, "references": list(r), "prediction": p}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return metrics


# --- language models: loss and perplexity on a text ---------------------------------------------


def causal_lm_loss(model, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss of a language model's batch of windows (`tformer.data.CausalLMCollator`): the
    model reads ``input_ids`` and is scored on ``labels``, which are already the next tokens.
    The one language-model loss of training, validation and evaluation. Packed rows (sft)
    carry ``document_ids``: each example attends to itself alone."""
    logits = model(input_ids=batch["input_ids"], document_ids=batch.get("document_ids"),
                   use_cache=False).logits  # (B, T, V)
    return compute_loss(logits, batch["labels"], label_smoothing)


@torch.no_grad()
def stream_loss(model, stream: np.ndarray, block_size: int, max_tokens: int, device,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                ) -> tuple[float, int]:
    """(token-mean cross-entropy, tokens scored) over every token of ``stream`` after the first,
    each predicted once from up to ``block_size`` tokens before it (`eval_windows`), read
    ``max_tokens / block_size`` windows at a time."""
    inputs, labels = eval_windows(stream, block_size)
    collate = CausalLMCollator()
    per_batch = max(1, max_tokens // len(inputs[0]))
    total, count = 0.0, 0
    for first in range(0, len(inputs), per_batch):
        rows = range(first, min(first + per_batch, len(inputs)))
        batch = collate([{"input_ids": inputs[i], "labels": labels[i]} for i in rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss = causal_lm_loss(model, batch)
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        total, count = total + loss.item() * n, count + n
    return total / count, count


def evaluate_text(generator: Seq2Seq, data: str | Path, *, output_dir: str | Path | None = None,
                  text_column: str = "text", block_size: int | None = None,
                  max_tokens: int = 8192) -> dict:
    """Loss and perplexity of a language model on ``data``: a ``.txt`` file, a folder of them,
    or the ``text_column`` of a JSONL/CSV/Parquet file, one document per file or record (see
    `tformer.data.load_documents`). Writes ``metrics.json`` into ``output_dir`` when given."""
    documents, _ = load_documents(data, columns=(text_column,))
    return evaluate_documents(generator, documents["text"], data=str(data),
                              output_dir=output_dir, block_size=block_size,
                              max_tokens=max_tokens)


def evaluate_documents(generator: Seq2Seq, documents: Sequence[str], *, data: str = "",
                       output_dir: str | Path | None = None, file_prefix: str = "",
                       block_size: int | None = None, max_tokens: int = 8192) -> dict:
    """The core of :func:`evaluate_text`, also used for a language model run's test split
    (`tformer.training.finish`). The documents are packed as in training (each followed by
    the end-of-text token); every token after the first is predicted once, from at most
    ``block_size`` tokens before it (default: the context the model was trained on, its
    tokenizer's ``model_max_length``, within its position table)."""
    model, tokenizer = generator.model, generator.tokenizer
    block = block_size or max_source_length_of(model, tokenizer)
    start = time.perf_counter()
    stream = pack_documents(tokenizer, documents, tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    try:
        loss, tokens = stream_loss(model, stream, block, max_tokens,
                                   next(model.parameters()).device)
    finally:
        model.train(was_training)
    metrics = {"model": generator.path, "data": data, "documents": len(documents),
               "tokens": tokens, "block_size": block, "loss": loss,
               "perplexity": math.exp(loss), "seconds": round(time.perf_counter() - start, 2)}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{file_prefix}metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
