"""OpenAI's two forms of log-probabilities, made from what the continuous batcher keeps per
generated token (``(token id, TokenLogprob)``: `tformer.serving.batcher.TokenLogprob`):

- ``/v1/completions`` (``logprobs: k``, the legacy form): ``{"tokens", "token_logprobs",
  "top_logprobs": [{text: logprob}, ...], "text_offset"}``;
- ``/v1/chat/completions`` (``logprobs: true``, ``top_logprobs: k``): ``{"content": [{"token",
  "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}``.

Which distribution: the model's own (raw) one, the log-softmax of its logits, before the
request's temperature, top-k and top-p: what the model thinks of each token, the same for a
greedy and a sampled request (vLLM's default too). A token is shown as its own text, decoded
alone with special tokens kept (an end-of-text token reads ``</s>``); ``text_offset`` adds up
these texts. A log-probability of minus infinity (a token copy attention gives probability 0)
is written -9999.0, as OpenAI writes it: JSON has no infinity.
"""

from __future__ import annotations

from collections.abc import Callable

from tformer.serving.batcher import TokenLogprob

#: What OpenAI writes for a log-probability of minus infinity.
FLOOR = -9999.0

Scored = list[tuple[int, TokenLogprob]]


def _finite(logprob: float) -> float:
    return max(logprob, FLOOR)


def completion_logprobs(scored: Scored, text_of: Callable[[int], str], offset: int = 0) -> dict:
    """The legacy form for ``scored`` tokens, their offsets counted from ``offset`` (where they
    start in the choice's text)."""
    tokens = [text_of(token) for token, _ in scored]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens,
            "token_logprobs": [_finite(entry.logprob) for _, entry in scored],
            "top_logprobs": [_by_text(entry.top, text_of) for _, entry in scored],
            "text_offset": offsets}


def _by_text(top: tuple[tuple[int, float], ...], text_of: Callable[[int], str]) -> dict:
    """{text: logprob}, most likely first; of two tokens with one text (two byte tokens both
    read U+FFFD), the likelier."""
    shown: dict[str, float] = {}
    for token, logprob in top:
        shown.setdefault(text_of(token), _finite(logprob))
    return shown


def chat_logprobs(scored: Scored, text_of: Callable[[int], str]) -> dict:
    """The chat form for ``scored`` tokens."""

    def one(token: int, logprob: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(token, entry.logprob),
                         "top_logprobs": [one(i, p) for i, p in entry.top]}
                        for token, entry in scored]}
