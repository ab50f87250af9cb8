"""The server's caps on requests, and the errors that name them.

Sizes of the input (number of texts, characters, tokens) are answered 413; options beyond what
the server allows (``max_new_tokens``, ``num_beams``) 422. Every error says which setting was
exceeded and its value, so a client can adapt without reading the server's command line."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

from tformer.serving.schemas import GenerationOptions
from tformer.serving.settings import ServeSettings


class ApiError(Exception):
    """An error answered as ``{"error": {code, message, limit, value}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, *, limit: str | None = None,
                 value: int | float | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit, self.value, self.headers = limit, value, headers

    def body(self) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.limit is not None:
            error.update(limit=self.limit, value=self.value)
        return {"error": error}


def check_texts(texts: Sequence[str], settings: ServeSettings, what: str = "inputs") -> None:
    """413 when there are too many texts or one is too long in characters."""
    if len(texts) > settings.max_inputs:
        raise ApiError(413, "too_many_inputs", f"{what} has {len(texts)} texts; the limit "
                       f"max_inputs is {settings.max_inputs}", limit="max_inputs",
                       value=settings.max_inputs)
    for i, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            raise ApiError(413, "input_too_long", f"{what}[{i}] has {len(text)} characters; the "
                           f"limit max_input_chars is {settings.max_input_chars}",
                           limit="max_input_chars", value=settings.max_input_chars)


def source_cap(asked: int | None, model_limit: int | None) -> int | None:
    """The truncation length of a request's sources: what it asked (``max_source_length``),
    never past the model's own limit (`tformer.generation.max_source_length_of`); None when
    neither is known."""
    if model_limit is None:
        return asked
    return min(asked or model_limit, model_limit)


def resolve_options(request: GenerationOptions, settings: ServeSettings,
                    model_limit: int | None = None) -> dict[str, Any]:
    """The keyword arguments for ``Seq2Seq.generate``: defaults filled in, caps checked (422),
    ``max_source_length`` clamped to the model's own limit and to ``max_input_tokens`` (a no-op
    on the inputs that pass `check_tokens`, and one value for every request that did not ask,
    so they share batches). Sampling-only options are dropped when not sampling, so equal
    decodings share a batch."""
    max_new_tokens = request.max_new_tokens or min(settings.default_max_new_tokens,
                                                   settings.max_new_tokens_cap)
    if max_new_tokens > settings.max_new_tokens_cap:
        raise ApiError(422, "max_new_tokens_too_large", f"max_new_tokens is {max_new_tokens}; "
                       f"the limit max_new_tokens_cap is {settings.max_new_tokens_cap}",
                       limit="max_new_tokens_cap", value=settings.max_new_tokens_cap)
    if request.num_beams > settings.max_beams:
        raise ApiError(422, "num_beams_too_large", f"num_beams is {request.num_beams}; the limit "
                       f"max_beams is {settings.max_beams}", limit="max_beams",
                       value=settings.max_beams)
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, num_beams=request.num_beams,
        length_penalty=request.length_penalty, no_repeat_ngram_size=request.no_repeat_ngram_size,
        do_sample=request.do_sample,
        max_source_length=min(source_cap(request.max_source_length, model_limit)
                              or settings.max_input_tokens, settings.max_input_tokens),
    )
    if request.do_sample:
        options.update(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
    return options


class TokenCounter:
    """Counts the tokens of inputs for the ``max_input_tokens`` cap, on the event loop's side.

    It holds its own copy of the tokenizer: the batcher's worker uses the model's tokenizer at
    the same time, and a Hugging Face fast tokenizer called from two threads at once fails
    ("Already borrowed"). A tokenizer that cannot be copied is shared under a lock instead."""

    def __init__(self, tokenizer) -> None:
        self._lock = threading.Lock()
        try:
            self.tokenizer = copy.deepcopy(tokenizer)
        except Exception:  # any failure to copy: share it under the lock
            self.tokenizer = tokenizer

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model reads them (special tokens included, no truncation);
        characters for an engine without a tokenizer."""
        if not texts:
            return []
        if self.tokenizer is None:
            return [len(text) for text in texts]
        with self._lock:
            ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return [len(row) for row in ids]


def check_tokens(counts: Sequence[int], max_source_length: int | None, settings: ServeSettings,
                 what: str = "inputs") -> list[int]:
    """The tokens the model will read per text (``counts`` truncated to the request's
    ``max_source_length``, if it gave one); 413 when one holds more than ``max_input_tokens``."""
    read = [min(n, max_source_length) if max_source_length else n for n in counts]
    for i, n in enumerate(read):
        if n > settings.max_input_tokens:
            raise ApiError(413, "input_too_long", f"{what}[{i}] has {n} tokens; the limit "
                           f"max_input_tokens is {settings.max_input_tokens} (or pass "
                           "max_source_length to truncate)", limit="max_input_tokens",
                           value=settings.max_input_tokens)
    return read
