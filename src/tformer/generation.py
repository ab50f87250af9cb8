"""The one generation entry point, used by the CLI, evaluation, training's validation and the
server. It always goes through Hugging Face ``generate()``: there is no second beam search.
A decoder-only model continues its prompts (`continue_texts`), beyond its context too, by
sliding a window over what it wrote.
(``tformer.load(..., engine="ctranslate2")`` swaps in CTranslate2's, behind the same interface:
see `tformer.ct2`.) This module only generates: checkpoints are read by `tformer.loading`, and
the engine is chosen by `tformer.engines.load`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

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
    on_text: Callable[[str], None] | None = None,
) -> list[str]:
    """Generate one output per input text, in input order. For a decoder-only model, the
    continuation of each text (see :func:`continue_texts`, which ``on_text`` streams to).

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
    if not getattr(model.config, "is_encoder_decoder", True):
        return continue_texts(
            model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            context=max_source_length, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size,
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            progress=progress, report=report, on_text=on_text)
    if on_text is not None:
        raise ValueError("streaming (on_text) continues the prompt of a decoder-only model; "
                         "this one is an encoder-decoder")
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


#: What continues a batch of prompts, whatever the engine: (prompts as token ids, how many
#: tokens at most, a streamer or None) -> each prompt's new token ids, an end-of-text token
#: included where the continuation ended. The torch engine's is `generate()` over left-padded
#: prompts; CTranslate2's (`tformer.ct2.engine.CT2Generator`) its ``Generator.generate_batch``.
ContinueIds = Callable[[list[list[int]], int, BaseStreamer | None], list[list[int]]]


@torch.inference_mode()
def continue_texts(
    model, tokenizer, texts: Sequence[str], *, max_new_tokens: int, batch_size: int = 32,
    context: int | None = None, progress: bool = False, report: dict | None = None,
    on_text: Callable[[str], None] | None = None, **options,
) -> list[str]:
    """Continue each prompt of a decoder-only model with up to ``max_new_tokens`` tokens;
    returns the continuations (the prompts left out, nothing stripped): `continue_prompts`
    through ``model.generate()``. ``context``: the most tokens the model reads, by default the
    context it was trained on (:func:`max_source_length_of`). ``options``: those of
    ``generate()`` (do_sample, top_k, ...).
    """
    if context is None:
        context = max_source_length_of(model, tokenizer)
    options = {k: v for k, v in options.items() if v is not None}
    if not options.get("do_sample"):
        for name in ("temperature", "top_k", "top_p"):
            options.pop(name, None)
    if options.get("num_beams", 1) == 1:
        options.pop("early_stopping", None)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def continue_ids(prompts: list[list[int]], count: int, streamer) -> list[list[int]]:
        return _generate_left_padded(model, pad, prompts, count, device, streamer, options)

    try:
        return continue_prompts(continue_ids, tokenizer, texts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, context=context, progress=progress,
                                report=report, on_text=on_text)
    finally:
        model.train(was_training)


def continue_prompts(
    continue_ids: ContinueIds, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
    batch_size: int, context: int, progress: bool = False, report: dict | None = None,
    on_text: Callable[[str], None] | None = None,
) -> list[str]:
    """The continuations of ``texts`` by any engine's ``continue_ids`` (`ContinueIds`): what
    both engines of a decoder-only model share, so that they read the same tokens.

    Prompts are encoded by `encode_prompts` (as the training text was; an empty prompt is the
    end-of-text token). ``context``: the most tokens the model reads. A prompt and its
    continuation that fit in it are one call, prompts batched by ``batch_size``. A longer one
    (nanoGPT's samples are hundreds of characters from a 64-character context) is continued
    one prompt at a time in steps of a quarter of the context, each step reading the last
    tokens that leave room for it (nanoGPT crops to the context before every token: same idea,
    fewer calls); so does a prompt too long for the context (counted as truncated).
    ``on_text`` (batches of one prompt) receives the text as it is generated. Continuations
    are decoded without special tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if context < 2:
        raise ValueError(f"the context must be at least 2 tokens, got {context}")
    if on_text is not None:
        batch_size = 1
    eos = tokenizer.eos_token_id
    encoded = encode_prompts(tokenizer, texts)
    step = max(1, context // 4)
    truncated = sum(len(ids) >= context for ids in encoded)  # no room for one more token
    outputs: list[str] = [""] * len(texts)
    starts = range(0, len(encoded), batch_size)
    if progress:
        starts = tqdm(starts, desc="generate", unit="batch")
    for start in starts:
        rows = range(start, min(start + batch_size, len(encoded)))
        streamer = None if on_text is None else TextPieces(tokenizer, on_text)
        if max(len(encoded[i]) for i in rows) + max_new_tokens <= context:
            new = continue_ids([encoded[i] for i in rows], max_new_tokens, streamer)
        else:
            new = [_slide(continue_ids, encoded[i], max_new_tokens, context, step, eos,
                          streamer) for i in rows]
        for i, ids in zip(rows, new):
            outputs[i] = tokenizer.decode(ids, skip_special_tokens=True)
    if truncated:
        log.warning("%d of %d prompt(s) did not fit the %d-token context and kept their end",
                    truncated, len(texts), context)
    if report is not None:
        report.update(truncated_sources=truncated, max_source_length=context)
    return outputs


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids a decoder-only model reads for each prompt: encoded as its training text
    was (no special token added); an empty prompt is the end-of-text token, after which every
    document starts. (`continue_prompts` and the attention maps read prompts so.)"""
    eos = tokenizer.eos_token_id
    return [ids or [eos] for ids in tokenizer(
        list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def _generate_left_padded(model, pad: int, prompts: list[list[int]], max_new_tokens: int,
                          device, streamer, options: dict) -> list[list[int]]:
    """One ``generate()`` for prompts padded on the left: the new tokens of each."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, streamer=streamer, **options)
    return out[:, width:].tolist()


def _slide(continue_ids: ContinueIds, prompt: list[int], max_new_tokens: int, context: int,
           step: int, eos: int, streamer) -> list[int]:
    """One prompt continued past the context: ``step`` tokens at a time, each call reading the
    last ``context - step`` tokens. Stops at the end-of-text token."""
    new: list[int] = []
    while len(new) < max_new_tokens:
        count = min(step, max_new_tokens - len(new))
        window = (prompt + new)[-(context - count):]
        produced = continue_ids([window], count, streamer)[0]
        new += produced
        if eos in produced or len(produced) < count:
            break
    return new


class TextPieces(BaseStreamer):
    """A ``generate()`` streamer that hands ``on_text`` the text of each new token as it comes,
    over the several ``generate()`` calls of a long continuation (`_slide`), not one as
    ``TextIteratorStreamer``, which also needs a thread. Each call's first ``put`` (its prompt)
    is skipped; the text is decoded from all the new tokens so far, and only whole characters
    are handed on (a byte-level token can end inside one)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.shown, self.prompt_next = 0, True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_next:
            self.prompt_next = False
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.shown and not text.endswith("\ufffd"):
            self.on_text(text[self.shown:])
            self.shown = len(text)

    def end(self) -> None:
        self.prompt_next = True


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
    engine: ClassVar[str] = "torch"  # "ctranslate2" for tformer.ct2.engine's engines

    @property
    def family(self) -> str:
        """"causal" for a decoder-only model (``generate`` continues prompts), else "seq2seq"
        (the CTranslate2 engines say the same)."""
        return "seq2seq" if getattr(self.model.config, "is_encoder_decoder", True) else "causal"

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
