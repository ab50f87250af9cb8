"""The continuous batcher's key/value cache: one slot per text being decoded.

`SlotCache` keeps the running batch's self-attention history in buffers allocated once for
``max_batch_size`` slots; an encoder-decoder model's rows also have an encoder side,
`SourceSlots` (cross-attention keys and values, with each slot's encoder output, source mask
and source ids), which a decoder-only model's rows have not. `SlotCache` is the
`tformer.model.attention.DecoderCache` that `tformer.serving.continuous.ContinuousBatcher`
hands to the model's decoder (through `tformer.serving.families`); the batcher owns the
scheduling (who joins, who leaves), this module the bookkeeping of where each row's keys and
values are.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Self-attention keys and values of some rows, per layer: (k, Hkv, W, Dh) each, a row's
#: history in its first columns (what a decoder-only model's prefill computes).
History = dict[int, tuple[Tensor, Tensor]]

#: An encoder-decoder model's encoded texts (`tformer.serving.families.EncoderDecoder.encode`):
#: the cross-attention keys and values of every layer as one tensor (L, 2, k, Hkv, S, Dh), the
#: encoder output (k, S, D), the source mask and the source ids (k, S).
Encoded = tuple[Tensor, Tensor, Tensor, Tensor]


class SlotCache:
    """The running batch's keys and values, one slot per text being decoded (a
    `tformer.model.attention.DecoderCache`).

    Buffers are allocated for ``capacity`` slots (``max_batch_size``) and slots ``[0, n)`` are in
    use. Self-attention: one (layers, 2, capacity, Hkv, T, Dh) buffer of every layer's keys and
    values (``self_kv``: per layer, views of it), in which slot ``r``'s history fills the first
    ``lengths[r]`` columns (left-aligned); a step writes every slot's new column in place, each
    at its own position (one indexed write per layer), and attends over the first
    ``max(lengths) + 1`` columns with ``target_mask`` hiding the columns past a slot's own.
    A slot joins with an empty history (an encoder-decoder model's row, which starts from the
    decoder's start token) or with one (a decoder-only model's prefilled prompt); ``fill``
    replaces the history of a running slot (a decoder-only row whose context is full slides
    its window). Cross-attention, for an encoder-decoder model: ``source`` (`SourceSlots`).

    A joining text takes slot ``n``; a leaving one gets a still-running slot from the end moved
    into its place. Joining and leaving thus copy only the slots that change, never the whole
    batch (re-packing the batch on every join and leave took about 15% of the time with 16
    clients). Each of these copies is one tensor operation over all layers: one per layer and
    per tensor took 8-10% of the batcher's time with 16 clients and 4 layers. Buffers grow,
    doubling, when a longer history or source comes, and never shrink. What a previous text
    left in a slot is masked, like padding.
    """

    HEADROOM = 32  # history columns of a fresh buffer

    def __init__(self, capacity: int, layers: int, kv_heads: int, head_dim: int,
                 like: Tensor, source: SourceSlots | None = None) -> None:
        """``like``: a tensor of the model's dtype and device (a parameter)."""
        self.capacity, self.layers, self.n = capacity, layers, 0
        self.source = source
        self._kv = like.new_zeros(layers, 2, capacity, kv_heads, self.HEADROOM, head_dim)
        self.self_kv = layer_views(self._kv)
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=like.device)
        self.history: list[int] = []  # lengths[:n] as Python ints (no device reads per step)
        self.width = 0  # history columns the current step attends over
        self._slots: Tensor | None = None  # arange(n), for the indexed writes of a step

    # -- the DecoderCache protocol ---------------------------------------------------------

    def seq_length(self) -> int:
        return self.width - 1

    def update_self(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write each slot's new column (k, v: (n, Hkv, 1, Dh)) at its own position."""
        if k.size(2) != 1:
            raise ValueError(f"SlotCache takes one new position per row, got {k.size(2)}")
        kb, vb = self.self_kv[layer]
        slots, at = self._slots, self.lengths[: self.n]
        kb[slots, :, at] = k[:, :, 0]  # (n, Hkv, Dh) at (slot, :, lengths[slot])
        vb[slots, :, at] = v[:, :, 0]
        return kb[: self.n, :, : self.width], vb[: self.n, :, : self.width]

    def get_cross(self, layer: int) -> tuple[Tensor, Tensor] | None:
        if self.source is None:
            raise RuntimeError("this SlotCache has no encoder side (a decoder-only model)")
        return self.source.cross(layer, self.n)

    def set_cross(self, layer: int, k: Tensor, v: Tensor) -> None:
        raise RuntimeError("SlotCache takes cross-attention keys and values through join()")

    # -- a step ----------------------------------------------------------------------------

    def begin_step(self) -> tuple[Tensor, Tensor]:
        """Room for one more column, then what the decoder takes for the slots in use: the
        positions (n,) of their new tokens and the target mask (n, width)."""
        self.width = max(self.history) + 1
        if self.width > self._kv.size(4):
            self._grow_history(2 * self.width)
        self._slots = torch.arange(self.n, device=self.lengths.device)
        positions = self.lengths[: self.n]
        columns = torch.arange(self.width, device=positions.device)
        return positions, columns[None, :] <= positions[:, None]

    def advance(self) -> None:
        """After a decoder step has written its column in every layer."""
        self.lengths[: self.n] += 1
        self.history = [x + 1 for x in self.history]

    # -- joining and leaving ---------------------------------------------------------------

    def join(self, k: int, history: History | None = None, lengths: list[int] | None = None,
             encoded: Encoded | None = None) -> None:
        """``k`` new slots: with an empty history, or with ``history`` (see `History`) of
        ``lengths`` columns each; with their encoder side ``encoded`` when the cache has one
        (see `SourceSlots.join`)."""
        if self.n + k > self.capacity:
            raise ValueError(f"{self.n} + {k} slots exceed the capacity of {self.capacity}")
        new = list(range(self.n, self.n + k))
        if (encoded is None) != (self.source is None):
            raise ValueError("an encoder side is given exactly to a cache that has one")
        if self.source is not None:
            self.source.join(slice(self.n, self.n + k), *encoded)
        self.n += k
        self.history += [0] * k
        self.fill(new, history, lengths or [0] * k)

    def fill(self, slots: list[int], history: History | None, lengths: list[int]) -> None:
        """Give slots in use a new history (None: an empty one) of ``lengths`` columns."""
        if history is not None:
            width = history[0][0].size(2)
            if width > self._kv.size(4):
                self._grow_history(max(width, 2 * self._kv.size(4)))
            at = torch.tensor(slots, device=self.lengths.device)
            # stacked as the buffer is (layers, 2, ...), to be written in one operation
            kv = torch.stack([x for i in range(self.layers) for x in history[i]])
            self._kv[:, :, at, :, :width] = kv.unflatten(0, (self.layers, 2))
        for slot, length in zip(slots, lengths):
            self.history[slot] = length
        self.lengths[slots] = torch.tensor(lengths, device=self.lengths.device)

    def keep(self, keep: list[int]) -> list[int]:
        """Keep slots ``keep`` (ascending) and pack them into ``[0, len(keep))``: each freed
        slot below that gets one of the kept slots above it. Returns, for each new slot, the
        old slot it holds."""
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            to = torch.tensor(holes, device=self.lengths.device)
            src = torch.tensor(movers, device=self.lengths.device)
            w = max(self.history[i] for i in movers)
            self._kv[:, :, to, :, :w] = self._kv[:, :, src, :, :w]
            self.lengths[to] = self.lengths[src]
            if self.source is not None:
                self.source.move(to, src, movers)
        self.n = n
        self.history = [self.history[i] for i in order]
        if self.source is not None:
            self.source.reorder(order)
        return order

    def _grow_history(self, columns: int) -> None:
        self._kv = widened(self._kv, 4, columns)
        self.self_kv = layer_views(self._kv)


class SourceSlots:
    """The encoder side of each slot, for an encoder-decoder model: the cross-attention keys and
    values of every layer in one (layers, 2, capacity, Hkv, S, Dh) buffer (``cross_kv``: per
    layer, views of it), the encoder output (capacity, S, D), the source mask and the source
    ids (capacity, S); the ids are read by copy attention's output (`tformer.model.copy`) only.
    Allocated at the first join (its widths come with it); moved with its slot by
    `SlotCache.keep`."""

    def __init__(self, capacity: int, layers: int) -> None:
        self.capacity, self.layers = capacity, layers
        self._kv: Tensor | None = None  # at first join
        self.cross_kv: dict[int, tuple[Tensor, Tensor]] = {}
        # ``memory`` is passed to ``decode`` (its cross-attention is told apart from
        # self-attention by having one) but not read there: the keys and values come from this
        # cache. Copy attention reads it, with the source ids.
        self.memory = self.source_mask = self.source_ids = None  # at first join
        self.sources: list[int] = []  # source length of each slot in use
        self.width = 0  # source columns the current step attends over

    def begin_step(self, n: int) -> tuple[Tensor, Tensor]:
        """The encoder output (n, S, D) and source mask (n, S) of the slots in use, as wide as
        their longest source (once per step, not once per layer)."""
        s = self.width = max(self.sources)
        return self.memory[:n, :s], self.source_mask[:n, :s]

    def cross(self, layer: int, n: int) -> tuple[Tensor, Tensor]:
        k, v = self.cross_kv[layer]
        return k[:n, :, : self.width], v[:n, :, : self.width]

    def ids(self, n: int) -> Tensor:
        """The source ids (n, S) of the slots in use, as wide as this step's memory."""
        return self.source_ids[:n, : self.width]

    def join(self, new: slice, cross_kv: Tensor, memory: Tensor, source_mask: Tensor,
             source_ids: Tensor) -> None:
        """Slots ``new`` get the rows of ``memory`` (k, S, D), with their cross-attention keys
        and values (L, 2, k, Hkv, S, Dh), source mask and ids (k, S): an `Encoded`."""
        s = source_mask.size(1)
        if self.memory is None:
            self._allocate(cross_kv, memory, s)
        elif s > self.memory.size(1):
            self._grow(max(s, 2 * self.memory.size(1)))
        self._kv[:, :, new, :, :s] = cross_kv
        self.memory[new, :s] = memory
        self.source_mask[new] = False
        self.source_mask[new, :s] = source_mask
        self.source_ids[new] = 0  # as the mask: nothing of a previous text stays
        self.source_ids[new, :s] = source_ids
        self.sources += source_mask.sum(1).clamp(min=1).tolist()  # masks are prefixes

    def move(self, to: Tensor, src: Tensor, movers: list[int]) -> None:
        """Copy slots ``src`` into slots ``to`` (``movers``: ``src`` as Python ints)."""
        s = max(self.sources[i] for i in movers)
        self._kv[:, :, to, :, :s] = self._kv[:, :, src, :, :s]
        for x in (self.memory, self.source_mask, self.source_ids):
            x[to] = x[src]

    def reorder(self, order: list[int]) -> None:
        self.sources = [self.sources[i] for i in order]

    def _allocate(self, kv: Tensor, memory: Tensor, s: int) -> None:
        r, (*_, h, _, dh) = self.capacity, kv.shape
        self._kv = kv.new_zeros(self.layers, 2, r, h, s, dh)
        self.cross_kv = layer_views(self._kv)
        self.memory = memory.new_zeros(r, s, memory.size(2))
        self.source_mask = torch.zeros(r, s, dtype=torch.bool, device=memory.device)
        self.source_ids = torch.zeros(r, s, dtype=torch.long, device=memory.device)

    def _grow(self, columns: int) -> None:
        # Everything widened first, then swapped in: a failed allocation changes nothing.
        kv = widened(self._kv, 4, columns)
        memory = widened(self.memory, 1, columns)
        source_mask = widened(self.source_mask, 1, columns)
        source_ids = widened(self.source_ids, 1, columns)
        self._kv, self.cross_kv, self.memory = kv, layer_views(kv), memory
        self.source_mask, self.source_ids = source_mask, source_ids


def concat_encoded(parts: list[Encoded]) -> Encoded:
    """Encoded batches (see `Encoded`) as one, to join together; their sources padded to the
    longest (masked; the ids' padding is 0, which the copy attention gives weight 0)."""
    s = max(p[2].size(1) for p in parts)
    cross = torch.cat([widened(p[0], 4, s) for p in parts], 2)  # rows are dim 2: (L, 2, k, ...)
    return cross, *(torch.cat([widened(p[k], 1, s) for p in parts]) for k in (1, 2, 3))


def split_encoded(encoded: Encoded, counts: list[int]) -> list[Encoded]:
    """The inverse of `concat_encoded`: ``encoded``'s rows, ``counts[i]`` rows to part ``i``,
    each part as wide as its own longest source (the masks are prefixes) and contiguous (a part
    is pickled to the batcher's process on its own)."""
    kv, memory, source_mask, source_ids = encoded
    parts, start = [], 0
    for count in counts:
        rows = slice(start, start + count)
        s = max(1, int(source_mask[rows].sum(1).max()))
        parts.append((kv[:, :, rows, :, :s].contiguous(), memory[rows, :s].contiguous(),
                      source_mask[rows, :s].contiguous(), source_ids[rows, :s].contiguous()))
        start += count
    return parts


def layer_views(kv: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """Each layer's keys and values in ``kv`` (L, 2, ...): views, for the per-layer reads and
    writes of a step (no indexing of the whole buffer per layer)."""
    return {i: (kv[i, 0], kv[i, 1]) for i in range(kv.size(0))}


def widened(x: Tensor, dim: int, size: int) -> Tensor:
    """``x`` zero-padded along ``dim`` to ``size``."""
    shape = list(x.shape)
    shape[dim] = size
    out = x.new_zeros(shape)
    out.narrow(dim, 0, x.size(dim)).copy_(x)
    return out
