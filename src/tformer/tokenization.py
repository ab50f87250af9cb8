"""Train, save and load the subword tokenizers tformer's own model uses.

One vocabulary serves source and target (the model ties its embeddings), so a tokenizer is
trained on both sides of the corpus. The pipeline, in the order the text goes through it:

1. Unicode NFKC normalisation. It folds compatibility characters (full-width letters, ligatures,
   superscripts) into their canonical form, so such characters do NOT round-trip exactly; all
   other text, whitespace included, is left as it is (no stripping, no lower-casing).
2. Metaspace: every space becomes ``▁``, a ``▁`` is prepended to the text, and words are split
   before each ``▁``. Decoding restores whitespace exactly: leading, trailing and repeated
   spaces, tabs and newlines. (A literal ``▁`` in the text comes back as a space.)
3. Model: Unigram (default, as SentencePiece) or BPE, both with byte fallback: a character
   missing from the vocabulary is encoded as its UTF-8 bytes (``<0x00>`` ... ``<0xFF>``, always
   in the vocabulary), so no text ever maps to ``<unk>``.
4. Post-processor: appends ``</s>`` to every sequence.

The special tokens have fixed ids, which the model relies on: ``<pad>`` 0, ``<unk>`` 1,
``<s>`` 2 (decoder start), ``</s>`` 3.
"""

from __future__ import annotations

import json
import logging
import os
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

TokenizerKind = Literal["unigram", "bpe"]


def _empty_tokenizer(kind: TokenizerKind) -> Tokenizer:
    if kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN, byte_fallback=True))
    else:
        raise ValueError(f"tokenizer kind must be 'unigram' or 'bpe', got {kind!r}")
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
    texts: Iterable[str], vocab_size: int = 8000, kind: TokenizerKind = "unigram"
) -> PreTrainedTokenizerFast:
    """Train a subword tokenizer with byte fallback on ``texts``.

    Args:
        texts: training text; pass both source and target texts, as the vocabulary is shared.
        vocab_size: total vocabulary size, the 4 special and 256 byte tokens included. The
            trainer may return fewer tokens on a small corpus.
        kind: ``"unigram"`` (SentencePiece-style) or ``"bpe"``.

    Returns:
        A fast tokenizer that appends ``</s>`` to every encoded sequence, pads on the right
        with id 0 and round-trips any NFKC-normalised text with no unknown token.
    """
    reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    if vocab_size < reserved + len(_ASCII_ALPHABET):
        raise ValueError(
            f"vocab_size must be at least {reserved + len(_ASCII_ALPHABET)} "
            f"({reserved} special and byte tokens plus the ASCII alphabet), got {vocab_size}"
        )
    tokenizer = _empty_tokenizer(kind)
    tokenizer.train_from_iterator(texts, _trainer(kind, vocab_size - len(BYTE_TOKENS)))
    tokenizer = _add_byte_tokens(tokenizer)
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
