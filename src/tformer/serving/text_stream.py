"""One output's text as its tokens arrive: what may be shown so far, never taken back, and cut
at the first stop sequence.

A batcher answers with ``tokenizer.decode(tokens, skip_special_tokens=True).strip()``. Shown
piece by piece, that text must add up to the same string. Decoding a prefix of the tokens does
not always give a prefix of the final text, so `TextStream` holds back what may still change:

- trailing white space (``strip()`` removes it at the end; ``clean_up_tokenization_spaces``
  removes a space before ``.``, ``,``, ``n't``... once the next token comes);
- a trailing U+FFFD (a character whose bytes are split over tokens, byte-level tokenizers);
- the text of trailing byte-fallback tokens (``<0xE2>``): a run of them is decoded as one
  group, and a byte that comes later can turn the whole run into U+FFFDs;
- a tail that could be the start of a stop sequence.

The final text (the batcher's) settles what was held back. The same cut applies to a whole
answer (:meth:`TextStream.finish` alone), so a streamed answer equals the non-streamed one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

log = logging.getLogger(__name__)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop sequence in ``text`` starts (None: none there)."""
    found = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(found) if found else None


def settled_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` (a prefix of an output still being decoded) can no longer change."""
    end = len(text.rstrip().rstrip("\ufffd"))
    for stop in stops:  # a tail that starts a stop sequence may become one
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end


class TextStream:
    """The visible text of one output: :meth:`add` with each new token gives what to send now,
    :meth:`finish` with the batcher's final text gives the rest. ``stopped``: a stop sequence
    was found (the text ends before it); nothing more is sent after that."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (),
                 held: Collection[int] = ()) -> None:
        self.decode, self.stops, self.held = decode, [s for s in stops if s], held
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that can be sent once ``token`` is decoded ("" while it may change)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        settled = len(self.tokens)
        while settled and self.tokens[settled - 1] in self.held:
            settled -= 1
        return self._advance(self.decode(self.tokens[:settled]).lstrip(), final=False)

    def finish(self, text: str) -> str:
        """The rest of the output, given its final text; ``sent`` is then the whole answer."""
        if self.stopped:
            return ""
        return self._advance(text, final=True)

    def _advance(self, text: str, final: bool) -> str:
        cut = first_stop(text, self.stops)
        if cut is not None:
            text, final, self.stopped = text[:cut], True, True
        shown = text if final else text[: settled_length(text, self.stops)]
        if not shown.startswith(self.sent):
            if not final:
                return ""  # decoding rewrote what was held back: wait for more
            # Text already sent cannot be taken back (no tokenizer here did this in tests).
            log.warning("a streamed output changed after it was sent: %r -> %r", self.sent, shown)
            return ""
        delta, self.sent = shown[len(self.sent):], shown
        return delta
