"""A language model's data (``data.task: lm``): documents packed into one token stream, and the
windows of it that training and validation read.

- `pack_documents`: every document's tokens followed by the end-of-text token (``</s>``), all
  in one stream, as nanoGPT's ``train.bin`` with the ends of documents marked;
- `RandomWindows`: training batches of windows at random starts (nanoGPT's ``get_batch``), each
  batch drawn from (seed, its index in the run) alone, so that resuming, or sharding over
  processes, needs only that index;
- `eval_windows`: a validation stream cut into consecutive blocks, every token predicted once;
- `hold_out_tail`: the last 10% of the text as validation when none is given (nanoGPT's split).

A window holds ``block_size`` inputs and, one token later, their ``block_size`` targets. Windows
cross the ends of documents, as in GPT-2's and nanoGPT's pretraining: the end-of-text token
tells the model that a new document begins; no mask keeps documents apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain

import numpy as np

from tformer.data.loading import DataError
from tformer.model import IGNORE_INDEX


def pack_documents(tokenizer, texts: Sequence[str], eot_id: int) -> np.ndarray:
    """The token stream (N,) int32: each text's tokens, with no special token of the tokenizer's
    own, then ``eot_id``."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return np.fromiter(chain.from_iterable((*doc, eot_id) for doc in ids), dtype=np.int32)


class Windows(Sequence):
    """``stream[start + shift : start + shift + length]`` for a window's ``start``: its inputs
    (``shift`` 0) or its targets (``shift`` 1). Indexed by start; numpy views, no copy."""

    def __init__(self, stream: np.ndarray, length: int, shift: int) -> None:
        self.stream, self.length, self.shift = stream, length, shift

    def __len__(self) -> int:  # the starts a whole window fits at
        return len(self.stream) - self.length

    def __getitem__(self, start: int) -> np.ndarray:
        return self.stream[start + self.shift : start + self.shift + self.length]


def windows(stream: np.ndarray, block_size: int) -> tuple[Windows, Windows]:
    """(inputs, targets) of the window at every start: the ``(input_ids, labels)`` pair the
    collator reads, as a seq2seq split's token lists."""
    return Windows(stream, block_size, 0), Windows(stream, block_size, 1)


class RandomWindows:
    """Training batches of ``stream``: ``batch_size`` window starts each, uniform over the
    starts a whole window fits at (nanoGPT's ``torch.randint(len(data) - block_size)``).

    Batch ``i`` of the run comes from ``numpy.random.default_rng([seed, i])`` alone. An epoch is
    the number of batches that read as many targets as the stream has (random windows overlap
    and miss, so it is a measure of data seen, not a pass); `batches` gives one epoch's,
    lazily, in the shape the loop's batch order takes (`tformer.training.setup.micro_batches`).
    """

    def __init__(self, n_tokens: int, block_size: int, batch_size: int, seed: int) -> None:
        if n_tokens < block_size + 1:
            raise DataError(f"the training text has {n_tokens} tokens; a window needs "
                            f"data.block_size + 1 = {block_size + 1}")
        self.n_starts = n_tokens - block_size
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.per_epoch = max(1, math.ceil((n_tokens - 1) / (batch_size * block_size)))

    def batch(self, index: int) -> list[int]:
        """The window starts of the run's batch ``index``."""
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(0, self.n_starts, size=self.batch_size).tolist()

    def batches(self, epoch: int) -> Sequence[list[int]]:
        return _Epoch(self, epoch)


class _Epoch(Sequence):
    """One epoch of `RandomWindows`, drawn as it is read."""

    def __init__(self, sampler: RandomWindows, epoch: int) -> None:
        self.sampler, self.first = sampler, epoch * sampler.per_epoch

    def __len__(self) -> int:
        return self.sampler.per_epoch

    def __getitem__(self, position: int) -> list[int]:
        if not 0 <= position < len(self):
            raise IndexError(position)
        return self.sampler.batch(self.first + position)


def eval_windows(stream: np.ndarray, block_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``stream`` cut into consecutive windows of ``block_size`` (inputs, targets), so that every
    token after the first is a target exactly once. The last window ends at the stream's end;
    where it overlaps the one before, those targets are read as context only (-100). A stream
    shorter than a block gives one shorter window."""
    n_targets = len(stream) - 1
    if n_targets < 1:
        raise DataError("the text to score has fewer than 2 tokens")
    length = min(block_size, n_targets)
    starts = list(range(0, n_targets - length + 1, length))
    skips = [0] * len(starts)
    covered = starts[-1] + length
    if covered < n_targets:
        starts.append(n_targets - length)
        skips.append(covered - starts[-1])
    inputs, targets = windows(stream, length)
    labels = []
    for start, skip in zip(starts, skips):
        target = targets[start]
        if skip:
            target = target.copy()
            target[:skip] = IGNORE_INDEX
        labels.append(target)
    return [inputs[s] for s in starts], labels


def hold_out_tail(texts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation): the last ``fraction`` of the characters of ``texts`` (in order) held
    out, as nanoGPT's ``data[:int(n * 0.9)]``; the document the cut falls in is split there."""
    total = sum(len(t) for t in texts)
    cut = int(total * (1 - fraction))
    seen = 0
    for i, text in enumerate(texts):
        if seen + len(text) > cut:
            head, tail = text[: cut - seen], text[cut - seen :]
            return [*texts[:i], *([head] if head else [])], [tail, *texts[i + 1 :]]
        seen += len(text)
    return list(texts), []
