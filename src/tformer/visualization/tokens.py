"""Readable labels for subword pieces, for the axes of attention maps.

A tokenizer's pieces carry markers meant for its decoder, not for people: ``▁`` (SentencePiece /
Metaspace) or ``Ġ`` (GPT-2 byte-level BPE, BART, RoBERTa) for a word start, ``##`` (WordPiece)
for a continuation, and ``<0xE4>``-style byte-fallback pieces for characters missing from the
vocabulary. :func:`readable_tokens` gives one label per piece (the maps keep one row or column
per token):

- markers are stripped (``▁man`` -> ``man``, ``Ġman`` -> ``man``, ``##ing`` -> ``ing``); a piece
  that is only a space becomes ``␣``;
- special tokens (``</s>``, ``<pad>``, ...) are kept as they are;
- pieces whose bytes are only part of a character (byte fallback, or byte-level BPE cutting a
  Chinese character) are decoded together with their neighbours: each piece of a run that
  spells ``中`` in three bytes is labelled ``中[1/3]``, ``中[2/3]``, ``中[3/3]``. A byte run that is
  not valid UTF-8 keeps the raw piece names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_METASPACE = "▁"
_SPACE_LABEL = "␣"
_MAX_RUN = 8  # pieces tried when joining partial characters (4 bytes at most per character)


def readable_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """One readable label per id of ``ids`` (see the module docstring)."""
    ids = [int(i) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    scheme = _scheme(tokenizer)
    raw = [None if p in special else _piece_bytes(p, scheme) for p in pieces]
    labels: list[str] = []
    i = 0
    while i < len(pieces):
        if raw[i] is None:  # a special token: shown as it is
            labels.append(str(pieces[i]))
            i += 1
            continue
        run = _decodable_run(raw, i)
        if run == 1:
            labels.append(_label(raw[i].decode("utf-8"), pieces[i], scheme))
        elif run > 1:
            text = _label(b"".join(raw[i : i + run]).decode("utf-8"), pieces[i], scheme)
            labels.extend(f"{text}[{k}/{run}]" for k in range(1, run + 1))
        else:  # no valid UTF-8 within reach: the raw piece is the most honest label
            labels.append(str(pieces[i]))
            run = 1
        i += run
    return labels


def _decodable_run(raw: list[bytes | None], start: int) -> int:
    """The fewest pieces from ``start`` whose bytes together are valid UTF-8; 0 if none."""
    for length in range(1, _MAX_RUN + 1):
        chunk = raw[start : start + length]
        if len(chunk) < length or any(b is None for b in chunk):
            return 0
        try:
            b"".join(chunk).decode("utf-8")
            return length
        except UnicodeDecodeError:
            continue
    return 0


def _label(text: str, piece: str, scheme: str) -> str:
    if scheme == "wordpiece" and piece.startswith("##"):
        text = text[2:]
    stripped = text.strip()
    return stripped if stripped else _SPACE_LABEL


def _piece_bytes(piece: str, scheme: str) -> bytes:
    """The bytes of the text a piece stands for (word-start markers become a space)."""
    byte = _BYTE_PIECE.match(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    if scheme == "bytelevel":
        table = _unicode_to_byte()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    return piece.replace(_METASPACE, " ").encode("utf-8")


def _scheme(tokenizer) -> str:
    """"bytelevel", "wordpiece" or "metaspace", read from a fast tokenizer's decoder (or, for
    a slow tokenizer, guessed from its class name)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        types = set(re.findall(r'"type":\s*"(\w+)"', json.dumps(json.loads(backend.to_str())
                                                                  .get("decoder") or {})))
        if "ByteLevel" in types:
            return "bytelevel"
        if "WordPiece" in types:
            return "wordpiece"
        return "metaspace"
    name = type(tokenizer).__name__.lower()
    if any(k in name for k in ("gpt2", "bart", "roberta")):
        return "bytelevel"
    return "wordpiece" if "bert" in name else "metaspace"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: printable bytes stand for
    themselves, the others are moved to code points 256 and up (space -> ``Ġ``)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}
