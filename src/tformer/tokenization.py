"""Train, save and load the tokenizers tformer's own models use.

One vocabulary serves source and target (the model ties its embeddings), so a tokenizer is
trained on both sides of the corpus. Four kinds (``data.tokenizer_kind``):

- ``bpe`` (default) and ``unigram``: the subword pipeline below;
- ``char``: one token per character of the corpus (nanoGPT's Shakespeare, Chinese poems): a
  `tokenizers` BPE with no merges over the corpus's characters, no normalisation, so text
  round-trips exactly (a character not in the vocabulary becomes ``<unk>``);
- ``bytelevel``: GPT-2's byte-level BPE (every text is bytes first, so nothing is unknown).

Every kind is a `tokenizers` model saved as ``tokenizer.json``, so checkpoints load with
``AutoTokenizer``. The subword pipeline, in the order the text goes through it:

1. Unicode NFKC normalisation. It folds compatibility characters (full-width letters, ligatures,
   superscripts) into their canonical form, so such characters do NOT round-trip exactly; all
   other text, whitespace included, is left as it is (no stripping, no lower-casing).
2. Metaspace: every space becomes ``▁``, a ``▁`` is prepended to the text, and words are split
   before each ``▁``. Decoding restores whitespace exactly: leading, trailing and repeated
   spaces, tabs and newlines. (A literal ``▁`` in the text comes back as a space.)
3. Model: Unigram (default, as SentencePiece) or BPE, both with byte fallback: a character
   missing from the vocabulary is encoded as its UTF-8 bytes (``<0x00>`` ... ``<0xFF>``, always
   in the vocabulary), so no text ever maps to ``<unk>``.
4. Post-processor: appends ``</s>`` to every sequence (seq2seq: the model learns where a
   sequence ends). A language model's tokenizer (``append_eos=False``) adds nothing: the
   data pipeline appends ``</s>``, the end-of-text token, after each document it packs, and a
   prompt is encoded as it is.

The special tokens have fixed ids, which the model relies on: ``<pad>`` 0, ``<unk>`` 1,
``<s>`` 2 (decoder start), ``</s>`` 3 (end of a sequence, of a document).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from typing import Literal

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tformer.hub import from_pretrained

logger = logging.getLogger(__name__)

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
#: Special tokens in id order: the token at position i has id i.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

# SentencePiece's names for the 256 byte tokens; the ByteFallback decoder reads exactly these.
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))
# Printable ASCII is always in the vocabulary, whatever the corpus: code and markup characters
# then never cost several byte tokens, and a literal "<0x41>" in the text is spelled with
# characters instead of matching the byte token (see _add_byte_tokens).
_ASCII_ALPHABET: list[str] = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t"]
_METASPACE = "▁"
#: The 256 characters byte-level BPE spells bytes with (GPT-2's table).
BYTE_LEVEL_ALPHABET: tuple[str, ...] = tuple(pre_tokenizers.ByteLevel.alphabet())

TokenizerKind = Literal["unigram", "bpe", "char", "bytelevel"]
KINDS: tuple[str, ...] = ("unigram", "bpe", "char", "bytelevel")


def _empty_tokenizer(kind: TokenizerKind) -> Tokenizer:
    if kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN, byte_fallback=True))
    else:
        raise ValueError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    # The ▁ marking a word start is added by the normaliser, not by Metaspace, so it is added
    # even before a leading space; decoding strips exactly that one character. Metaspace's own
    # prepending skips text that already starts with a space, which loses that space on decoding.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Prepend(_METASPACE), normalizers.Replace(" ", _METASPACE)]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_METASPACE, prepend_scheme="never", split=True
    )
    # ByteFallback turns <0xNN> runs back into characters, Metaspace turns every ▁ back into a
    # space, Fuse joins the pieces and Strip removes the space the normaliser prepended.
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.ByteFallback(),
            decoders.Metaspace(replacement=_METASPACE, prepend_scheme="never", split=True),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return tokenizer


def _trainer(kind: TokenizerKind, learned_size: int) -> trainers.Trainer:
    if kind == "unigram":
        return trainers.UnigramTrainer(
            vocab_size=learned_size,
            special_tokens=list(SPECIAL_TOKENS),
            unk_token=UNK_TOKEN,
            initial_alphabet=_ASCII_ALPHABET,
            max_piece_length=16,
            show_progress=False,
        )
    return trainers.BpeTrainer(
        vocab_size=learned_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_ASCII_ALPHABET,
        show_progress=False,
    )


def _add_byte_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """Insert the 256 byte tokens at ids 4..259, after the special tokens.

    The `tokenizers` trainers do not create byte tokens, and passing them as special tokens
    would make ``decode(skip_special_tokens=True)`` drop them, so they are written into the
    trained model's vocabulary here. Unigram gets them with a score far below any learned
    piece: the lattice then never prefers a literal ``<0x41>`` string over its characters
    (byte fallback finds byte tokens by name, not by score).
    """
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    specials = len(SPECIAL_TOKENS)
    if model["type"] == "Unigram":
        vocab = [piece for piece in model["vocab"] if piece[0] not in BYTE_TOKENS]
        lowest = min((score for _, score in vocab[specials:]), default=0.0)
        bytes_ = [[token, lowest - 1000.0] for token in BYTE_TOKENS]
        model["vocab"] = vocab[:specials] + bytes_ + vocab[specials:]
        model["byte_fallback"] = True
    else:  # BPE: the vocabulary is token -> id; merges name tokens, not ids.
        ordered = sorted(model["vocab"].items(), key=lambda item: item[1])
        tokens = [token for token, _ in ordered if token not in BYTE_TOKENS]
        tokens = tokens[:specials] + list(BYTE_TOKENS) + tokens[specials:]
        model["vocab"] = {token: i for i, token in enumerate(tokens)}
        model["byte_fallback"] = True
    # Added tokens (the specials) keep their ids 0..3, so they need no renumbering.
    return Tokenizer.from_str(json.dumps(spec))


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` built by this module as a Hugging Face fast tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        # Lengths are capped by the data pipeline (max_source_length, max_target_length).
        model_max_length=1_000_000_000,
        padding_side="right",
        # The default clean-up joins " ." into "." and would break exact round trips.
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, kind: TokenizerKind = "unigram",
    append_eos: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of ``kind`` on ``texts``.

    Args:
        texts: training text; pass both source and target texts, as the vocabulary is shared.
        vocab_size: total vocabulary size, the special tokens (and for ``bpe`` / ``unigram``
            the 256 byte tokens) included. The trainer may return fewer tokens on a small
            corpus; ``char`` keeps every character when they fit, else the most frequent.
        kind: ``"unigram"`` (SentencePiece-style), ``"bpe"``, ``"char"`` or ``"bytelevel"``.
        append_eos: append ``</s>`` to every encoded sequence (seq2seq); False for a language
            model's tokenizer, which adds no token of its own.

    Returns:
        A fast tokenizer that pads on the right with id 0. ``bpe``, ``unigram`` and
        ``bytelevel`` round-trip any (for the first two, NFKC-normalised) text with no
        unknown token; ``char`` round-trips every text made of its characters.
    """
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    reserved = len(SPECIAL_TOKENS) + {"char": 1, "bytelevel": len(BYTE_LEVEL_ALPHABET)}.get(
        kind, len(BYTE_TOKENS) + len(_ASCII_ALPHABET))
    if vocab_size < reserved:
        raise ValueError(f"vocab_size must be at least {reserved} for a {kind} tokenizer "
                         f"(its special and base tokens), got {vocab_size}")
    if kind == "char":
        tokenizer = _char_tokenizer(texts, vocab_size)
    elif kind == "bytelevel":
        tokenizer = _bytelevel_tokenizer(texts, vocab_size)
    else:
        tokenizer = _empty_tokenizer(kind)
        tokenizer.train_from_iterator(texts, _trainer(kind, vocab_size - len(BYTE_TOKENS)))
        tokenizer = _add_byte_tokens(tokenizer)
    if append_eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS_TOKEN}",
            pair=f"$A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
            special_tokens=[(EOS_TOKEN, EOS_ID)],
        )
    for token, expected in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS)), strict=True):
        actual = tokenizer.token_to_id(token)
        if actual != expected:  # the model hard-codes these ids
            raise RuntimeError(f"special token {token} got id {actual}, expected {expected}")
    logger.info("trained a %s tokenizer: %d tokens", kind, tokenizer.get_vocab_size())
    return wrap_tokenizer(tokenizer)


def _char_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """One token per character: the special tokens, then the corpus's characters in code-point
    order (nanoGPT's ``sorted(set(text))``), all of them if they fit in ``vocab_size``, else
    the most frequent (ties by code point). A BPE model with no merges maps each character
    to its id, with no normalisation or pre-tokenisation, so text (newlines, spaces, CJK)
    comes back exactly; the Fuse decoder joins the characters."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    room = vocab_size - len(SPECIAL_TOKENS)
    kept = sorted(counts, key=lambda c: (-counts[c], c))[:room]
    if len(kept) < len(counts):
        dropped = sum(counts[c] for c in counts) - sum(counts[c] for c in kept)
        logger.warning("char tokenizer: %d of %d characters kept (vocab_size %d); the other %d "
                       "occurrences become <unk>", len(kept), len(counts), vocab_size, dropped)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(kept)])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _bytelevel_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """GPT-2's byte-level BPE: text is read as UTF-8 bytes, each spelled by one of 256
    printable characters, split by GPT-2's pattern, then merged. Deterministic (BPE)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=list(BYTE_LEVEL_ALPHABET), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike[str]) -> None:
    """Save ``tokenizer`` so that `transformers.AutoTokenizer.from_pretrained` reloads it."""
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(path_or_name: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or a Hugging Face Hub name (offline first: the
    local cache, then the Hub only if it answers; see `tformer.hub`). Remote code never runs.

    Raises:
        FileNotFoundError: ``path_or_name`` looks like a local path and does not exist, or is a
            Hub name that is not cached while the Hub cannot be reached.
    """
    return from_pretrained(AutoTokenizer, path_or_name, "tokenizer", trust_remote_code=False)
