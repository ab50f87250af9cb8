"""Length-bucketed batches under a token budget, resumable mid-epoch.

Batching examples of similar length wastes little compute on padding; a token budget instead
of a fixed batch size keeps the memory of every step about the same, whether its sequences are
short or long.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yield lists of example indices, each batch within a budget of padded tokens.

    The cost of a batch is ``batch_size * max(longest source, longest target)``: the number
    of positions in the larger of its two padded tensors, which is what bounds activation
    memory. Every batch costs at most ``max_tokens``, except that an example longer than
    ``max_tokens`` on its own forms a batch of one (a warning counts them at construction;
    cut such examples with ``max_source_length``/``max_target_length`` to avoid them).

    Each epoch the examples are sorted by ``max(source, target)`` length, then by source
    length, ties broken at random; the sorted order is cut greedily into batches, and the
    order of the batches is shuffled. Everything is a function of ``(seed, epoch)``, so every
    process of a distributed run computes the same batches (let `accelerate` shard them).
    With ``shuffle=False`` batches come in ascending length, the same every epoch.

    Resuming: `state_dict` records the epoch and the batches yielded so far in it; after
    `load_state_dict` the next iteration continues with the following batch, without touching
    the data of the skipped ones. A `DataLoader` with workers, or `accelerate` (which fetches
    one batch ahead), draws batches before the training step uses them, so the count kept
    here can run ahead of training: a trainer should store the number of batches it trained
    on, as ``{"epoch": e, "batches_consumed": n}``, and pass that to `load_state_dict`.

    A completed pass starts the same epoch again from its first batch; call `set_epoch` with
    the next epoch for a new order, as with `torch.utils.data.DistributedSampler`.
    """

    def __init__(
        self,
        source_lengths: Sequence[int],
        target_lengths: Sequence[int],
        max_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
        max_batch_size: int | None = None,
    ) -> None:
        if len(source_lengths) != len(target_lengths):
            raise ValueError(
                f"{len(source_lengths)} source lengths but {len(target_lengths)} target lengths"
            )
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be positive or None, got {max_batch_size}")
        self.source_lengths = np.asarray(source_lengths, dtype=np.int64)
        self.target_lengths = np.asarray(target_lengths, dtype=np.int64)
        self.max_tokens = max_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.max_batch_size = max_batch_size
        self._longest = np.maximum(self.source_lengths, self.target_lengths)
        self.epoch = 0
        self._consumed = 0  # batches of self.epoch yielded so far
        self._cache: tuple[int, list[list[int]]] | None = None
        too_long = int((self._longest > max_tokens).sum())
        if too_long:
            logger.warning(
                "%d examples are longer than max_tokens=%d; each forms a batch of its own",
                too_long,
                max_tokens,
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (and restart it)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._consumed = 0

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one), in the order they are yielded.

        Reading them does not move the position that `state_dict` records.
        """
        return [list(batch) for batch in self._batches(self.epoch if epoch is None else epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches(self.epoch)
        for position in range(self._consumed, len(batches)):
            self._consumed = position + 1  # counted as soon as the caller holds it
            yield list(batches[position])
        self._consumed = 0

    def __len__(self) -> int:
        """Batches in a full pass over the current epoch (a resumed pass yields fewer)."""
        return len(self._batches(self.epoch))

    def state_dict(self) -> dict[str, int]:
        """The position to resume from: the epoch and the batches already yielded in it."""
        return {"epoch": self.epoch, "batches_consumed": self._consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict`: the next iteration skips the consumed batches."""
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        total = len(self._batches(epoch))
        if not 0 <= consumed <= total:
            raise ValueError(f"batches_consumed={consumed}, but epoch {epoch} has {total}")
        self.epoch, self._consumed = epoch, consumed

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:  # one epoch's batches are kept
            self._cache = (epoch, self._make_batches(epoch))
        return self._cache[1]

    def _make_batches(self, epoch: int) -> list[list[int]]:
        count = len(self._longest)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            # lexsort is stable: a random permutation first breaks ties at random.
            permutation = rng.permutation(count)
            keys = (self.source_lengths[permutation], self._longest[permutation])
            order = permutation[np.lexsort(keys)]
        else:
            order = np.lexsort((self.source_lengths, self._longest))
        batches = self._cut(order.tolist())
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _cut(self, order: list[int]) -> list[list[int]]:
        longest = self._longest.tolist()
        limit = self.max_batch_size or len(order)
        batches: list[list[int]] = []
        batch: list[int] = []
        batch_max = 0
        for index in order:
            length = longest[index]
            widest = max(batch_max, length)
            if batch and ((len(batch) + 1) * widest > self.max_tokens or len(batch) >= limit):
                batches.append(batch)
                batch, widest = [], length
            batch.append(index)
            batch_max = widest
        if batch:
            batches.append(batch)
        return batches


def padding_fraction(
    batches: Sequence[Sequence[int]],
    source_lengths: Sequence[int],
    target_lengths: Sequence[int],
) -> float:
    """The fraction of positions in the padded source and target tensors that are padding."""
    source = np.asarray(source_lengths, dtype=np.int64)
    target = np.asarray(target_lengths, dtype=np.int64)
    padded = real = 0
    for batch in batches:
        rows = np.asarray(batch, dtype=np.int64)
        padded += len(rows) * (int(source[rows].max()) + int(target[rows].max()))
        real += int(source[rows].sum()) + int(target[rows].sum())
    return 1.0 - real / padded if padded else 0.0
