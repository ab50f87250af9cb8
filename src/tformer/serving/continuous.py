"""Continuous batching: requests join and leave the running batch at every decoding step.

Dynamic batching (`tformer.serving.batching`) runs one ``generate()`` per round: a request that
arrives while a batch is decoding waits for it to end, and every text of a batch waits for the
longest one. Continuous (iteration-level) batching, as in Orca (Yu et al., OSDI 2022), schedules
per step instead. One worker thread owns the model and loops:

1. **admit** waiting requests while the batch has room (``max_batch_size`` texts): encode them
   together, compute their cross-attention keys and values, and append their rows to the
   running batch with an empty history;
2. **step**: one decoder step for every running row, each at its own position;
3. **retire** the rows that produced EOS or reached their ``max_new_tokens`` (or whose client
   left): a request is answered as soon as its own texts are done.

A request therefore waits at most one decoder step to start, and never for someone else's longer
output. Rows of different ages share one key/value cache, right-aligned: each row's history
fills the last ``length`` columns and the columns before are masked (``target_mask``); a new
row joins with an empty history, and columns no row uses any more are cut off. Positions are
per row (`tformer.model.Transformer.decode` ``positions``).

This path is greedy decoding of the own Transformer. Beam search, sampling and n-gram blocking,
and Hugging Face models, run through ``generate()`` as whole batches in the same worker, between
two steps. Why by hand: Hugging Face ``generate()`` decodes a fixed batch to its end, and the
serving engines that schedule per step (vLLM, TGI) are built for decoder-only models on GPUs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tformer.serving.batching import (
    _STOP,
    BatcherStopped,
    BatchResult,
    DynamicBatcher,
    _Call,
    _Job,
    _settle,
)

log = logging.getLogger(__name__)


#: Generation-config settings under which ``generate()``'s greedy search is plain argmax
#: (no logits processor): this path does nothing else, so anything else goes to ``generate()``.
_PLAIN = {"repetition_penalty": (None, 1.0), "min_length": (None, 0), "min_new_tokens": (None, 0),
          "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
          "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
          "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
          "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
          "encoder_repetition_penalty": (None, 1.0)}


def supports_continuous(seq2seq) -> bool:
    """True for a `tformer.Seq2Seq` holding the own Transformer (the model this path drives)
    whose generation config asks for nothing but plain greedy search."""
    from tformer.hf import TformerForConditionalGeneration

    model = getattr(seq2seq, "model", None)
    if getattr(seq2seq, "engine", None) != "torch" or not isinstance(
            model, TformerForConditionalGeneration):
        return False
    generation = model.generation_config
    return all(getattr(generation, name, None) in plain for name, plain in _PLAIN.items())


def is_greedy(options: dict) -> bool:
    return (options.get("num_beams", 1) == 1 and not options.get("do_sample", False)
            and not options.get("no_repeat_ngram_size", 0))


class RowCache:
    """The running batch's keys and values (a `tformer.model.attention.DecoderCache`).

    Self-attention: per layer a (B, H, capacity, Dh) buffer whose first ``length`` columns are
    in use, right-aligned per row (``target_mask`` (B, length), True at a row's real columns);
    a step writes its column in place instead of concatenating the whole history anew.
    Cross-attention: (B, H, S, Dh) per layer, left-aligned like ``memory`` (B, S, D) and
    ``source_mask`` (B, S).
    """

    HEADROOM = 16  # free columns left in a buffer whenever one is (re)built

    def __init__(self, self_kv: dict, length: int, cross_kv: dict, target_mask: Tensor,
                 memory: Tensor, source_mask: Tensor) -> None:
        self.self_kv, self.length, self.cross_kv = self_kv, length, cross_kv
        self.target_mask, self.memory, self.source_mask = target_mask, memory, source_mask

    @classmethod
    def new_rows(cls, cross_kv: dict, memory: Tensor, source_mask: Tensor) -> RowCache:
        """Rows that have not decoded anything yet (an empty history)."""
        b, h, _, dh = next(iter(cross_kv.values()))[0].shape
        empty = memory.new_zeros(b, h, 0, dh)
        return cls({i: (empty, empty) for i in cross_kv}, 0, cross_kv,
                   source_mask.new_zeros(b, 0), memory, source_mask)

    # -- the DecoderCache protocol ---------------------------------------------------------

    def seq_length(self) -> int:
        return self.length

    def update_self(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kb, vb = self.self_kv[layer]
        end = self.length + k.size(2)
        if end > kb.size(2):  # full: double the room
            kb, vb = (self._resized(x, 0, self.length, 2 * end) for x in (kb, vb))
            self.self_kv[layer] = (kb, vb)
        kb[:, :, self.length:end] = k
        vb[:, :, self.length:end] = v
        return kb[:, :, :end], vb[:, :, :end]

    def advance(self, steps: int = 1) -> None:
        """After a decoder step has written its column in every layer."""
        self.length += steps
        self.target_mask = torch.nn.functional.pad(self.target_mask, (0, steps), value=True)

    def get_cross(self, layer: int) -> tuple[Tensor, Tensor] | None:
        return self.cross_kv.get(layer)

    def set_cross(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.cross_kv[layer] = (k, v)

    # -- joining and leaving ---------------------------------------------------------------

    @staticmethod
    def _resized(x: Tensor, start: int, end: int, capacity: int, rows: Tensor | None = None,
                 right: int | None = None) -> Tensor:
        """Columns [start, end) of ``x`` (B, H, C, Dh) in a new buffer of ``capacity`` columns,
        ending at column ``right`` (default: starting at 0); only ``rows`` if given."""
        n = end - start
        if rows is not None:  # the kept columns first: no copy of the unused capacity
            x, start, end = x[:, :, start:end].index_select(0, rows), 0, n
        right = n if right is None else right
        out = x.new_zeros(x.size(0), x.size(1), capacity, x.size(3))
        out[:, :, right - n:right] = x[:, :, start:end]
        return out

    def concat(self, other: RowCache) -> RowCache:
        """The rows of ``self`` then those of ``other``: histories right-aligned to the longer
        one, sources padded on the right."""
        t = max(self.length, other.length)
        s = max(self.memory.size(1), other.memory.size(1))
        capacity = t + self.HEADROOM

        def history(a: RowCache, x: Tensor) -> Tensor:
            return a._resized(x, 0, a.length, capacity, right=t)

        def source(x: Tensor, ds: int) -> Tensor:  # (B, H, S, Dh) or (B, S, D) or (B, S)
            pad = (0, ds) if x.dim() == 2 else (0, 0, 0, ds)
            return torch.nn.functional.pad(x, pad) if ds else x

        ds_a, ds_b = s - self.memory.size(1), s - other.memory.size(1)
        self_kv = {i: tuple(torch.cat([history(self, x), history(other, y)])
                            for x, y in zip(self.self_kv[i], other.self_kv[i]))
                   for i in self.self_kv}
        cross_kv = {i: tuple(torch.cat([source(x, ds_a), source(y, ds_b)])
                             for x, y in zip(self.cross_kv[i], other.cross_kv[i]))
                    for i in self.cross_kv}
        mask = lambda a: torch.nn.functional.pad(a.target_mask, (t - a.length, 0), value=False)  # noqa: E731
        return RowCache(self_kv, t, cross_kv, torch.cat([mask(self), mask(other)]),
                        torch.cat([source(self.memory, ds_a), source(other.memory, ds_b)]),
                        torch.cat([source(self.source_mask, ds_a),
                                   source(other.source_mask, ds_b)]))

    def select(self, index: Tensor) -> RowCache:
        """Keep rows ``index``, then cut the history columns and source columns that none of
        them uses."""
        target_mask = self.target_mask.index_select(0, index)
        source_mask = self.source_mask.index_select(0, index)
        first = int(target_mask.any(0).int().argmax()) if self.length else 0  # right-aligned
        end = int(source_mask.any(0).nonzero().max()) + 1  # sources are left-aligned
        length = self.length - first
        self_kv = {i: tuple(self._resized(x, first, self.length, length + self.HEADROOM, index)
                            for x in kv) for i, kv in self.self_kv.items()}
        cross_kv = {i: tuple(x.index_select(0, index)[:, :, :end] for x in kv)
                    for i, kv in self.cross_kv.items()}
        return RowCache(self_kv, length, cross_kv, target_mask[:, first:],
                        self.memory.index_select(0, index)[:, :end], source_mask[:, :end])


@dataclass(eq=False)
class _Request:
    """A job being decoded: its outputs fill in as its rows finish."""

    job: _Job
    started: float
    outputs: list[str | None] = field(default_factory=list)
    remaining: int = 0
    peak: int = 0  # most rows that shared a step with this request


@dataclass
class _Rows:
    """The running batch: per row, its request, generated tokens and next input."""

    requests: list[_Request]
    slots: list[int]  # index of the row's text in its request
    tokens: list[list[int]]
    max_new: list[int]
    last: Tensor  # (B,) the token each row feeds next
    length: Tensor  # (B,) tokens in each row's history = the position of ``last``
    cache: RowCache

    def __len__(self) -> int:
        return len(self.slots)


class ContinuousBatcher(DynamicBatcher):
    """`DynamicBatcher`'s interface (``submit``, ``call``, ``stop``, ``stats``) with per-step
    scheduling for greedy requests to the own Transformer; see the module's docstring.
    A greedy request joins the running batch at the next step, without waiting for company;
    ``max_wait_ms`` applies to whole-batch jobs (beam search, sampling) when nothing decodes.
    ``stop()`` takes no newcomers and finishes the rows in flight."""

    mode = "continuous"

    def __init__(self, seq2seq, *, max_batch_size: int, max_wait_ms: float, max_queue: int) -> None:
        if not supports_continuous(seq2seq):
            raise ValueError("continuous batching drives tformer's own Transformer with plain "
                             "greedy search; this model is "
                             f"{type(getattr(seq2seq, 'model', seq2seq)).__name__} (or its "
                             "generation config adds logits processors)")
        super().__init__(seq2seq, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                         max_queue=max_queue)
        model = seq2seq.model.eval()  # no dropout, whatever state it was handed over in
        generation = model.generation_config
        self.transformer = model.model
        self.start_id = (generation.decoder_start_token_id
                         if generation.decoder_start_token_id is not None
                         else model.config.decoder_start_token_id)
        eos = generation.eos_token_id if generation.eos_token_id is not None else (
            model.config.eos_token_id)
        self.eos_ids = set(eos) if isinstance(eos, list | tuple) else {eos}
        self.pad_id = model.config.pad_token_id
        embeddings = self.transformer.tgt_embed
        self.max_positions = embeddings.max_positions if embeddings.learned is not None else None
        #: steps: decoder steps; row_steps: rows decoded over all steps; joined: rows admitted
        #: while others were decoding.
        self.stats.update(steps=0, row_steps=0, joined=0)

    def _continuous(self, job: _Job) -> bool:
        """Greedy, fits a batch, and (learned positions) fits the position table: a request
        that fails must fail alone, so one that would overrun goes to ``generate()``."""
        n = job.options.get("max_new_tokens", 0)
        return (is_greedy(job.options) and len(job.texts) <= self.max_batch_size
                and (self.max_positions is None or n <= self.max_positions))

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        rows: _Rows | None = None
        stopping = False
        while not (stopping and rows is None):  # once stopping: no newcomers, finish the rows
            admitted: list[_Request] = []
            if not stopping:
                try:
                    admitted, stopping = self._gather(rows)
                except Exception:  # a bug here must not kill the only worker
                    log.exception("batcher round failed")
            if admitted:
                try:
                    with torch.inference_mode():
                        rows = self._admit(rows, admitted)  # leaves ``rows`` alone if it fails
                except Exception as error:  # e.g. a text the encoder cannot take: its own fault
                    log.exception("admitting %d requests failed", len(admitted))
                    self._fail(admitted, error)
            if rows is not None:
                try:
                    with torch.inference_mode():
                        rows = self._step(rows)
                except Exception as error:
                    log.exception("a decoding step failed")
                    self._fail(rows.requests, error)
                    rows = None
        for item in [*self._carry, *self._drain()]:
            if item is not _STOP:
                _settle(item, error=BatcherStopped("the server is shutting down"))

    def _fail(self, requests: list[_Request], error: BaseException) -> None:
        unique = {id(r): r for r in requests}.values()
        self.stats["failed"] += len(unique)
        for request in unique:
            _settle(request.job, error=error)

    def _gather(self, rows: _Rows | None) -> tuple[list[_Request], bool]:
        """New requests for the running batch, as many as fit (blocks only when nothing runs).
        A whole-batch job (with the queued jobs of the same options) or another call runs here,
        one per step, so the running rows never wait for more than one of them."""
        admitted: list[_Request] = []
        room = self.max_batch_size - (len(rows) if rows is not None else 0)
        while room > 0:
            idle = rows is None and not admitted
            item = self._take(None if idle else 0)
            if item is None:
                break
            if item is _STOP:
                return admitted, True
            if isinstance(item, _Call):
                self._run_call(item)
                break
            if not self._continuous(item):
                self._run_round(self._same_options(item, wait=idle))
                break
            if len(item.texts) > room:
                self._carry.appendleft(item)  # first in line at the next step
                break
            with self._lock:
                self._waiting -= len(item.texts)
            admitted.append(_Request(item, time.monotonic(), [None] * len(item.texts),
                                     len(item.texts)))
            room -= len(item.texts)
        return admitted, False

    def _same_options(self, first: _Job, wait: bool) -> list[_Job]:
        """``first`` and the queued jobs with its options, up to ``max_batch_size`` texts: one
        ``generate()`` call. It waits up to ``max_wait_ms`` for more only when no rows are
        decoding; everything else taken meanwhile goes back in line, in order."""
        group, size, others = [first], len(first.texts), []
        deadline = time.monotonic() + (self.max_wait_s if wait else 0.0)
        while size < self.max_batch_size:
            item = self._take(deadline - time.monotonic())
            if item is None:
                break
            if (isinstance(item, _Job) and item.key == first.key
                    and size + len(item.texts) <= self.max_batch_size):
                group.append(item)
                size += len(item.texts)
                continue
            others.append(item)
            if item is _STOP:
                break
        self._carry.extendleft(reversed(others))
        return group

    def _admit(self, rows: _Rows | None, requests: list[_Request]) -> _Rows:
        """Encode the new texts and join them to ``rows`` with an empty history: their first
        decoder step (from the start token) is the next step of the whole batch."""
        ids: list[list[int]] = []
        for request in requests:
            options = request.job.options
            ids += self.seq2seq.tokenizer(request.job.texts, truncation=True,
                                          max_length=options.get("max_source_length"))["input_ids"]
        device = self.transformer.src_embed.token.weight.device
        width = max(1, max(len(x) for x in ids))
        source = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        source_mask = torch.zeros(len(ids), width, dtype=torch.bool)
        for i, x in enumerate(ids):
            source[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            source_mask[i, : max(len(x), 1)] = True  # an empty text still has one position
        source, source_mask = source.to(device), source_mask.to(device)
        memory = self.transformer.encode(source, source_mask).hidden
        cross = {i: layer.cross_attn.memory_kv(memory)
                 for i, layer in enumerate(self.transformer.decoder.layers)}
        new = _Rows(
            requests=[r for r in requests for _ in r.job.texts],
            slots=[i for r in requests for i in range(len(r.job.texts))],
            tokens=[[] for _ in ids],
            max_new=[r.job.options["max_new_tokens"] for r in requests for _ in r.job.texts],
            last=torch.full((len(ids),), self.start_id, dtype=torch.long, device=device),
            length=torch.zeros(len(ids), dtype=torch.long, device=device),
            cache=RowCache.new_rows(cross, memory, source_mask),
        )
        if rows is None:
            return new
        self.stats["joined"] += len(new)
        return _Rows(rows.requests + new.requests, rows.slots + new.slots,
                     rows.tokens + new.tokens, rows.max_new + new.max_new,
                     torch.cat([rows.last, new.last]), torch.cat([rows.length, new.length]),
                     rows.cache.concat(new.cache))

    def _step(self, rows: _Rows) -> _Rows | None:
        """One greedy decoder step for every running row."""
        cache = rows.cache
        mask = torch.nn.functional.pad(cache.target_mask, (0, 1), value=True)
        hidden = self.transformer.decode(rows.last[:, None], cache.memory, cache.source_mask,
                                         cache, positions=rows.length, target_mask=mask).hidden
        cache.advance()
        rows.last = self.transformer.project(hidden[:, -1]).argmax(-1)
        rows.length = rows.length + 1
        for tokens, token in zip(rows.tokens, rows.last.tolist()):
            tokens.append(int(token))
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(rows)
        return self._retire(rows)

    def _retire(self, rows: _Rows) -> _Rows | None:
        """Answer the rows that are done (EOS, their ``max_new_tokens``, or their client left)
        and keep the others."""
        size = len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], size)
        keep = []
        for i, (request, slot, tokens) in enumerate(zip(rows.requests, rows.slots, rows.tokens)):
            request.peak = max(request.peak, size)
            if request.job.future.cancelled():
                if request.remaining:
                    request.remaining = 0
                    self.stats["dropped"] += 1
                continue
            if tokens[-1] not in self.eos_ids and len(tokens) < rows.max_new[i]:
                keep.append(i)
                continue
            request.outputs[slot] = self.seq2seq.tokenizer.decode(
                tokens, skip_special_tokens=True).strip()
            request.remaining -= 1
            if request.remaining == 0:
                self._answer(request)
        if len(keep) == size:
            return rows
        if not keep:
            return None
        index = torch.tensor(keep, device=rows.last.device)
        return _Rows([rows.requests[i] for i in keep], [rows.slots[i] for i in keep],
                     [rows.tokens[i] for i in keep], [rows.max_new[i] for i in keep],
                     rows.last.index_select(0, index), rows.length.index_select(0, index),
                     rows.cache.select(index))

    def _answer(self, request: _Request) -> None:
        outputs = [text or "" for text in request.outputs]
        now = time.monotonic()
        self.stats["texts"] += len(outputs)
        _settle(request.job, BatchResult(
            outputs=outputs, output_tokens=self._count_tokens(outputs),
            batch_inputs=request.peak,
            queue_ms=(request.started - request.job.submitted) * 1000.0,
            generate_ms=(now - request.started) * 1000.0,
        ))
