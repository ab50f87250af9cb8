"""Pad a list of tokenised examples into the tensors a seq2seq model takes; stack a language
model's windows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Seq2SeqCollator:
    """Collate examples with ``input_ids`` and ``labels`` into right-padded LongTensors.

    Returns ``input_ids`` (B, S) padded with ``pad_token_id``; ``attention_mask`` (B, S), 1 for a
    token and 0 for padding (the Hugging Face convention); ``labels`` (B, T) padded with
    ``label_pad_id`` (-100, ignored by the loss); and ``decoder_input_ids`` (B, T): the labels
    shifted right behind ``decoder_start_token_id``, padded with ``pad_token_id``. The shift is
    done here, once: the model must not shift the labels again. Examples without ``labels``
    give only ``input_ids`` and ``attention_mask`` (generation). Other keys are ignored.
    """

    pad_token_id: int
    decoder_start_token_id: int
    label_pad_id: int = -100
    #: Round S and T up to a multiple of this (tensor-core friendly shapes), or None.
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        sources = [_as_list(feature["input_ids"]) for feature in features]
        input_ids = self._pad(sources, self.pad_token_id)  # (B, S)
        batch = {"input_ids": input_ids, "attention_mask": self._mask(sources, input_ids.shape)}
        if "labels" not in features[0]:
            return batch
        targets = [_as_list(feature["labels"]) for feature in features]
        # Teacher forcing: position t of the decoder sees the start token and labels[:t].
        shifted = [[self.decoder_start_token_id, *labels[:-1]] if labels else []
                   for labels in targets]
        batch["labels"] = self._pad(targets, self.label_pad_id)  # (B, T)
        batch["decoder_input_ids"] = self._pad(shifted, self.pad_token_id)  # (B, T)
        return batch

    def _width(self, rows: list[list[int]]) -> int:
        width = max(len(row) for row in rows)
        multiple = self.pad_to_multiple_of
        if multiple:
            width = -(-width // multiple) * multiple
        return width

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        padded = torch.full((len(rows), self._width(rows)), value, dtype=torch.long)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return padded

    @staticmethod
    def _mask(rows: list[list[int]], shape: torch.Size) -> torch.Tensor:
        lengths = torch.tensor([len(row) for row in rows])
        return (torch.arange(shape[1]) < lengths[:, None]).long()  # (B, S)


@dataclass(frozen=True)
class CausalLMCollator:
    """Stack windows of a token stream (`tformer.data.packing`) into ``input_ids`` and ``labels``,
    both (B, T) LongTensors. The windows have one length, so nothing is padded, and the labels
    are already the next tokens (-100 where a target is not scored): nothing is shifted here or
    in the model."""

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        return {key: torch.as_tensor(np.stack([np.asarray(f[key]) for f in features]),
                                     dtype=torch.long)
                for key in ("input_ids", "labels")}


def _as_list(ids: Any) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
