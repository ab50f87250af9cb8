"""Turn {source, target} text examples into token ids, truncating and counting truncations."""

from __future__ import annotations

import logging
from collections import abc
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence, Value
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TOKEN_FEATURES = Features(
    {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))}
)


@dataclass(frozen=True)
class TruncationReport:
    """How many of ``examples`` had their source or target cut to the maximum length."""

    examples: int
    truncated_sources: int
    truncated_targets: int

    def __str__(self) -> str:
        return (
            f"truncated {self.truncated_sources} of {self.examples} sources and "
            f"{self.truncated_targets} targets"
        )


def tokenize_examples(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int,
    max_target_length: int,
) -> tuple[Dataset, TruncationReport]:
    """Tokenise the ``source`` and ``target`` columns into ``input_ids`` and ``labels``.

    Sequences are encoded with the tokenizer's special tokens (tformer's tokenizers append
    ``</s>``). A sequence longer than its maximum keeps its trailing special tokens: the text
    is cut, the final ``</s>`` stays, so the model still learns where a sequence ends.

    Returns:
        A dataset with only the int columns ``input_ids`` and ``labels`` (row order kept), and
        a `TruncationReport`, which is also logged.
    """
    limits = {"max_source_length": max_source_length, "max_target_length": max_target_length}
    for name, value in limits.items():
        if value < 2:
            raise ValueError(f"{name} must be at least 2 (a token and </s>), got {value}")

    def encode(batch: dict[str, list[str]]) -> dict[str, Any]:
        sources, targets = encode_pairs(tokenizer, batch["source"], batch["target"])
        return {
            "input_ids": truncate_all(sources, max_source_length, tokenizer),
            "labels": truncate_all(targets, max_target_length, tokenizer),
            "source_truncated": [len(ids) > max_source_length for ids in sources],
            "target_truncated": [len(ids) > max_target_length for ids in targets],
        }

    encoded = dataset.map(
        encode,
        batched=True,
        remove_columns=dataset.column_names,
        features=Features(
            {**TOKEN_FEATURES, "source_truncated": Value("bool"), "target_truncated": Value("bool")}
        ),
        desc="tokenizing",
    )
    report = TruncationReport(
        examples=len(encoded),
        truncated_sources=_count_true(encoded, "source_truncated"),
        truncated_targets=_count_true(encoded, "target_truncated"),
    )
    logger.info("%s", report)
    return encoded.remove_columns(["source_truncated", "target_truncated"]), report


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, sources: abc.Sequence[str], targets: abc.Sequence[str],
    max_source_length: int | None = None, max_target_length: int | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of sources and targets, with special tokens: the one encoding of pairs
    (training, BPE-dropout epochs, attention maps). Not truncated by default (training cuts
    afterwards, :func:`truncate_all`). ``max_source_length``: sources cut by the tokenizer, as
    `tformer.generation.generate_texts` cuts them; ``max_target_length``: a longer target keeps
    its first tokens and its last (``</s>``)."""
    if max_source_length is None:
        source_ids = tokenizer(list(sources))["input_ids"]
    else:
        source_ids = tokenizer(list(sources), truncation=True,
                               max_length=max_source_length)["input_ids"]
    # text_target selects the target-side tokenizer where one exists (e.g. Marian).
    label_ids = tokenizer(text_target=list(targets))["input_ids"]
    if max_target_length is not None:
        label_ids = [ids if len(ids) <= max_target_length
                     else ids[: max_target_length - 1] + ids[-1:] for ids in label_ids]
    return source_ids, label_ids


def truncate_all(
    sequences: list[list[int]], max_length: int, tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Each sequence cut to ``max_length`` as `tokenize_examples` cuts it (``</s>`` kept)."""
    # A trailing <unk> is text, not a marker the post-processor added.
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    return [_truncate(ids, max_length, special) for ids in sequences]


def sequence_lengths(dataset: Dataset, column: str) -> list[int]:
    """The length of every token list in ``column``, read from Arrow without decoding rows."""
    # The "arrow" format honours select()/shuffle() views of the dataset.
    return pc.list_value_length(dataset.with_format("arrow")[column]).to_pylist()


def _truncate(ids: list[int], max_length: int, special: set[int]) -> list[int]:
    if len(ids) <= max_length:
        return ids
    tail = 0  # the special tokens the post-processor appended (</s>), kept at the end
    while tail < len(ids) and ids[len(ids) - 1 - tail] in special:
        tail += 1
    tail = min(tail, max_length - 1)
    return ids[: max_length - tail] + ids[len(ids) - tail :]


def _count_true(dataset: Dataset, column: str) -> int:
    return int(pc.sum(dataset.with_format("arrow")[column]).as_py() or 0)
