"""The server's caps on requests, and the errors that name them.

Sizes of the input (number of texts, characters, tokens) are answered 413; options beyond what
the server allows (``max_new_tokens``, ``num_beams``) 422. Every error says which setting was
exceeded and its value, so a client can adapt without reading the server's command line."""

from __future__ import annotations

import copy
import functools
import re
import threading
from collections.abc import Sequence
from typing import Any

from tformer.serving.schemas import GenerationOptions
from tformer.serving.settings import ServeSettings

#: The OpenAI-compatible routes (`tformer.serving.openai_api`): their errors take OpenAI's form.
OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


class ApiError(Exception):
    """An error answered as ``{"error": {code, message, limit, value}}`` with ``status``, or
    on the OpenAI-compatible routes as OpenAI's ``{"error": {message, type, param, code}}``
    (:meth:`openai_body`; ``param``: the request field at fault)."""

    def __init__(self, status: int, code: str, message: str, *, limit: str | None = None,
                 value: int | float | None = None, headers: dict[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit, self.value, self.headers, self.param = limit, value, headers, param

    def body(self) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.limit is not None:
            error.update(limit=self.limit, value=self.value)
        return {"error": error}

    @property
    def openai_status(self) -> int:
        """OpenAI answers a bad field 400 (its clients raise BadRequestError), not 422."""
        return 400 if self.status == 422 else self.status

    def openai_body(self) -> dict:
        kind = ("authentication_error" if self.status == 401 else "server_error"
                if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def check_texts(texts: Sequence[str], settings: ServeSettings, what: str = "inputs") -> None:
    """413 when there are too many texts or one is too long in characters."""
    if len(texts) > settings.max_inputs:
        raise ApiError(413, "too_many_inputs", f"{what} has {len(texts)} texts; the limit "
                       f"max_inputs is {settings.max_inputs}", limit="max_inputs",
                       value=settings.max_inputs, param=what)
    for i, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            raise ApiError(413, "input_too_long", f"{what}[{i}] has {len(text)} characters; the "
                           f"limit max_input_chars is {settings.max_input_chars}",
                           limit="max_input_chars", value=settings.max_input_chars, param=what)


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


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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

    def count(self, texts: Sequence[str], special: bool = True) -> list[int]:
        """Tokens per text as the model reads them (special tokens included, no truncation;
        ``special=False``: as an output is counted, without them); characters for an engine
        without a tokenizer."""
        if not texts:
            return []
        if self.tokenizer is None:
            return [len(text) for text in texts]
        with self._lock:
            ids = self.tokenizer(list(texts), add_special_tokens=special)["input_ids"]
        return [len(row) for row in ids]

    @functools.cached_property
    def byte_tokens(self) -> frozenset[int]:
        """The ids of byte-fallback tokens (``<0xE2>``), whose text depends on the tokens after
        them (`tformer.serving.text_stream`)."""
        if self.tokenizer is None:
            return frozenset()
        with self._lock:
            vocab = self.tokenizer.get_vocab()
        return frozenset(i for token, i in vocab.items() if _BYTE_TOKEN.fullmatch(token))

    def decode(self, tokens: list[int]) -> str:
        """``tokens`` as text, special tokens skipped, as the batchers decode an output."""
        with self._lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> str:
        """``messages`` rendered by the tokenizer's chat template, ready for the answer."""
        with self._lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)


def check_tokens(counts: Sequence[int], max_source_length: int | None, settings: ServeSettings,
                 what: str = "inputs") -> list[int]:
    """The tokens the model will read per text (``counts`` truncated to the request's
    ``max_source_length``, if it gave one); 413 when one holds more than ``max_input_tokens``."""
    read = [min(n, max_source_length) if max_source_length else n for n in counts]
    for i, n in enumerate(read):
        if n > settings.max_input_tokens:
            raise ApiError(413, "input_too_long", f"{what}[{i}] has {n} tokens; the limit "
                           f"max_input_tokens is {settings.max_input_tokens}"
                           + (" (or pass max_source_length to truncate)"
                              if what in ("inputs", "input") else ""), limit="max_input_tokens",
                           value=settings.max_input_tokens, param=what)
    return read
