"""The one generation entry point, used by the CLI, evaluation, training's validation and the
server. It always goes through Hugging Face ``generate()``: there is no second beam search.
(``tformer.load(..., engine="ctranslate2")`` swaps in CTranslate2's, behind the same interface:
see `tformer.ct2`.) This module only generates: checkpoints are read by `tformer.loading`, and
the engine is chosen by `tformer.engines.load`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: The source limit of a model that states none (no position table, no tokenizer limit).
DEFAULT_MAX_SOURCE_LENGTH = 1024
_UNBOUNDED = 1_000_000  # transformers' "no limit" model_max_length is larger than this


def max_source_length_of(model, tokenizer) -> int:
    """The longest source the checkpoint reads, in tokens: the smaller of its tokenizer's
    ``model_max_length`` and its position table (tformer's ``max_positions``, Hugging Face's
    ``max_position_embeddings``); `DEFAULT_MAX_SOURCE_LENGTH` when it states neither. Every
    path that reads sources (generate, evaluate, attention, the server) truncates to it unless
    told otherwise, so memory stays bounded on any input."""
    limits = []
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < _UNBOUNDED:
        limits.append(model_max)
    config = getattr(model, "config", None)
    for name in ("max_positions", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    return min(limits) if limits else DEFAULT_MAX_SOURCE_LENGTH


@torch.inference_mode()
def generate_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    max_source_length: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | None = None,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    progress: bool = False,
    report: dict | None = None,
) -> list[str]:
    """Generate one output per input text, in input order.

    ``max_new_tokens`` is required: ``generate()``'s default length silently cuts outputs at
    20 tokens. Inputs are sorted by length so each batch pads little; the order is restored.
    ``early_stopping=True`` ends a beam search once ``num_beams`` hypotheses are finished (as
    CTranslate2, fairseq and Marian do); ``False`` keeps searching while Hugging Face's
    heuristic says a running beam could still win; None (default) = the checkpoint's
    generation config (False unless it says otherwise).
    ``repetition_penalty`` > 1 makes every token already in the output less likely (Hugging
    Face's CTRL penalty: a positive logit divided by it, a negative one multiplied).

    Sources are truncated to ``max_source_length`` tokens, by default the checkpoint's own
    limit (:func:`max_source_length_of`); how many were is logged and, with ``report`` (a dict),
    stored in it as ``truncated_sources`` beside ``max_source_length``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_source_length is None:
        max_source_length = max_source_length_of(model, tokenizer)
    elif max_source_length < 1:
        raise ValueError(f"max_source_length must be >= 1, got {max_source_length}")
    truncated = 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    outputs: list[str] = [""] * len(texts)
    options = dict(
        max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
        length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty,
    )
    if do_sample:
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if num_beams > 1 and early_stopping is not None:  # generate() warns about it without beams
        options.update(early_stopping=early_stopping)
    starts = range(0, len(order), batch_size)
    if progress:
        starts = tqdm(starts, desc="generate", unit="batch")
    try:
        for start in starts:
            chunk = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in chunk], return_tensors="pt", padding=True,
                truncation=True, max_length=max_source_length,
            )
            truncated += _count_truncated(enc)
            enc = enc.to(device)
            ids = model.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **options
            )
            for i, text in zip(chunk, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                outputs[i] = text.strip()
    finally:
        model.train(was_training)
    if truncated:
        log.warning("%d of %d source(s) were longer than %d tokens and were truncated "
                    "(max_source_length)", truncated, len(texts), max_source_length)
    if report is not None:
        report.update(truncated_sources=truncated, max_source_length=max_source_length)
    return outputs


def _count_truncated(enc) -> int:
    """Sources cut by the tokenizer: a fast tokenizer keeps what it cut as ``overflowing``; a
    slow one cannot tell, and the rows that fill ``max_length`` exactly are not counted."""
    encodings = getattr(enc, "encodings", None) or []
    return sum(1 for e in encodings if e.overflowing)


@dataclass
class Seq2Seq:
    """A loaded model and its tokenizer: what ``tformer.load`` returns and the CLI, the
    evaluation and the server use."""

    model: torch.nn.Module
    tokenizer: object
    path: str = ""
    engine: ClassVar[str] = "torch"  # "ctranslate2" for tformer.ct2.engine.CT2Seq2Seq

    def generate(self, texts: Sequence[str] | str, *, max_new_tokens: int = 128,
                 **options) -> list[str] | str:
        """Generate for one text (returns a string) or many (returns a list, input order).
        Options: see :func:`generate_texts` (num_beams, length_penalty, early_stopping,
        no_repeat_ngram_size, repetition_penalty, do_sample, temperature, top_k, top_p, batch_size,
        max_source_length, progress, report)."""
        single = isinstance(texts, str)
        out = generate_texts(self.model, self.tokenizer, [texts] if single else list(texts),
                             max_new_tokens=max_new_tokens, **options)
        return out[0] if single else out
