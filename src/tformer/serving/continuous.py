"""Continuous batching: requests join and leave the running batch at every decoding step.

Dynamic batching (`tformer.serving.batching`) runs one ``generate()`` per round: a request that
arrives while a batch is decoding waits for it to end, and every text of a batch waits for the
longest one. Continuous (iteration-level) batching, as in Orca (Yu et al., OSDI 2022), schedules
per step instead. One worker thread owns the running batch and loops:

1. **admit** waiting requests while the batch has room (``max_batch_size`` texts): encode them
   together, compute their cross-attention keys and values, and give them free slots with an
   empty history;
2. **step**: one decoder step for every running row, each at its own position;
3. **retire** the rows that produced EOS or reached their ``max_new_tokens`` (or whose client
   left): a request is answered as soon as its own texts are done.

A request therefore waits at most one decoder step to start, and never for someone else's longer
output. Rows of different ages share one key/value cache, one slot per row
(`tformer.serving.slot_cache.SlotCache`): each row's history fills the first columns of its
slot, a step writes every row's new column at the row's own position, and the columns past a
row's history are masked (``target_mask``). A new row takes a free slot with an empty history;
a row that leaves frees its slot. Positions are per row (`tformer.model.Transformer.decode`
``positions``).

This path is greedy decoding and sampling (temperature, top-k, top-p; each row with its own
random generator, seeded per request: `tformer.serving.sampling`) of the own Transformer, with
or without copy attention (whose output reads the source ids, kept per slot); greedy and
sampled rows share a step. Beam search and n-gram blocking, and Hugging Face models, run
through ``generate()`` as whole batches in the same worker, between two steps.

A job submitted as a stream (``stream``: `tformer.serving.batcher.TokenStream`) gets its rows'
new tokens pushed at every step, before its answer; a row its stream closes (its client found a
stop sequence) retires at the next step, as with an end-of-sequence token.

Why by hand: Hugging Face ``generate()`` decodes a fixed batch to its end, and the
serving engines that schedule per step (vLLM, TGI) are built for decoder-only models on GPUs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tformer.hf import TformerForConditionalGeneration
from tformer.serving.batcher import BatcherStopped, BatchResult, TokenStream
from tformer.serving.batching import STOP, Call, DynamicBatcher, Job, settle
from tformer.serving.sampling import RowSampler, row_sampler, sample
from tformer.serving.slot_cache import SlotCache, concat_encoded

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
    """True for a `tformer.Seq2Seq` holding the own Transformer (the model this path drives),
    with or without copy attention, whose generation config asks for nothing but plain greedy
    search."""
    model = getattr(seq2seq, "model", None)
    if getattr(seq2seq, "engine", None) != "torch" or not isinstance(
            model, TformerForConditionalGeneration):
        return False
    generation = model.generation_config
    return all(getattr(generation, name, None) in plain for name, plain in _PLAIN.items())


def is_stepwise(options: dict) -> bool:
    """Greedy search or sampling, with nothing this path does not do (beams, n-gram blocking)."""
    return options.get("num_beams", 1) == 1 and not options.get("no_repeat_ngram_size", 0)


@dataclass(eq=False)
class Decoding:
    """A job being decoded: its outputs fill in as its rows finish. (Public for the tests and
    ``bench/serve_step.py``, which drive the batcher's steps by hand.)"""

    job: Job
    started: float
    outputs: list[str | None] = field(default_factory=list)
    remaining: int = 0
    peak: int = 0  # most rows that shared a step with this request
    reasons: dict[int, str] = field(default_factory=dict)  # text index -> "stop" or "length"


@dataclass
class _Rows:
    """The running batch: per row (= slot of ``cache``), its request, generated tokens and
    next input."""

    requests: list[Decoding]
    slots: list[int]  # index of the row's text in its request
    tokens: list[list[int]]
    max_new: list[int]
    last: Tensor  # (B,) the token each row feeds next
    cache: SlotCache
    samplers: list[RowSampler | None]  # None: greedy

    def __len__(self) -> int:
        return len(self.slots)


class ContinuousBatcher(DynamicBatcher):
    """`DynamicBatcher`'s queue and the same `tformer.serving.batcher.Batcher` interface, with
    per-step scheduling for greedy and sampled requests to the own Transformer; see the
    module's docstring. Such a request joins the running batch at the next step, without
    waiting for company; ``max_wait_ms`` applies to whole-batch jobs (beam search) when nothing
    decodes.
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
        #: while others were decoding; pre_encoded: rows admitted already encoded; active: rows
        #: in the running batch after the last step.
        self.stats.update(steps=0, row_steps=0, joined=0, pre_encoded=0, active=0)
        self._cache = SlotCache(max_batch_size, len(self.transformer.decoder.layers))

    def submit_encoded(self, texts: Sequence[str], options: dict[str, Any],
                       encoded: tuple) -> asyncio.Future:
        """As ``submit``, for texts already encoded by :meth:`encode` (in another process, on
        its own copy of the model): the worker only joins them to the running batch."""
        return self._enqueue(list(texts), options, encoded).future

    def stream_encoded(self, texts: Sequence[str], options: dict[str, Any],
                       encoded: tuple) -> TokenStream:
        """As ``stream``, for texts already encoded by :meth:`encode`."""
        return self._enqueue(list(texts), options, encoded, stream=True).stream

    def encode(self, texts: Sequence[str], options: dict[str, Any]) -> tuple:
        """What admitting ``texts`` computes before it joins them: cross-attention keys and
        values per layer, encoder output, source mask and source ids (see
        ``submit_encoded``)."""
        return self._encode(*self._tokenize([Job(list(texts), options, None, None)]))

    def steps(self, texts: Sequence[str], options: dict[str, Any]) -> bool:
        """Whether a job joins the running batch (else it runs whole, through
        ``generate()``): greedy or sampled (`is_stepwise`), fits a batch, and (learned
        positions) fits the position table: a request that fails must fail alone, so one that
        would overrun goes to ``generate()``."""
        n = options.get("max_new_tokens", 0)
        return (is_stepwise(options) and len(texts) <= self.max_batch_size
                and (self.max_positions is None or n <= self.max_positions))

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        rows: _Rows | None = None
        stopping = False
        while not (stopping and rows is None):  # once stopping: no newcomers, finish the rows
            admitted: list[Decoding] = []
            if not stopping:
                try:
                    admitted, stopping = self._gather(rows)
                except Exception:  # a bug here must not kill the only worker
                    log.exception("batcher round failed")
            if admitted:
                rows = self._admit_all(rows, admitted)
            if rows is not None:
                try:
                    rows = self._step(rows)
                except Exception as error:
                    log.exception("a decoding step failed")
                    self._fail(rows.requests, error)
                    rows = None
                    self._cache.keep([])
                    self.stats["active"] = 0
        for item in [*self._carry, *self._drain()]:
            if item is not STOP:
                settle(item, error=BatcherStopped("the server is shutting down"))

    def _admit_all(self, rows: _Rows | None, requests: list[Decoding]) -> _Rows | None:
        """Admit ``requests`` together; if that fails (e.g. a text the encoder cannot take),
        each one alone, so that only the requests at fault get the error. A failed admission
        leaves ``rows`` and the cache as they were."""
        try:
            return self._admit(rows, requests)
        except Exception as error:
            if len(requests) == 1:
                log.exception("admitting a request failed")
                self._fail(requests, error)
                return rows
        for request in requests:
            try:
                rows = self._admit(rows, [request])
            except Exception as error:
                log.exception("admitting a request failed")
                self._fail([request], error)
        return rows

    def _fail(self, requests: list[Decoding], error: BaseException) -> None:
        unique = {id(r): r for r in requests}.values()
        self.stats["failed"] += len(unique)
        for request in unique:
            settle(request.job, error=error)

    def _gather(self, rows: _Rows | None) -> tuple[list[Decoding], bool]:
        """New requests for the running batch, as many as fit (blocks only when nothing runs).
        A whole-batch job (with the queued jobs of the same options) or another call runs here,
        one per step, so the running rows never wait for more than one of them."""
        admitted: list[Decoding] = []
        room = self.max_batch_size - (len(rows) if rows is not None else 0)
        while room > 0:
            idle = rows is None and not admitted
            item = self._take(None if idle else 0)
            if item is None:
                break
            if item is STOP:
                return admitted, True
            if isinstance(item, Call):
                self._run_call(item)
                break
            if not self.steps(item.texts, item.options):
                self._run_round(self._same_options(item, wait=idle))
                break
            if len(item.texts) > room:
                self._carry.appendleft(item)  # first in line at the next step
                break
            with self._lock:
                self._waiting -= len(item.texts)
            admitted.append(Decoding(item, time.monotonic(), [None] * len(item.texts),
                                     len(item.texts)))
            room -= len(item.texts)
        return admitted, False

    def _same_options(self, first: Job, wait: bool) -> list[Job]:
        """``first`` and the queued jobs with its options, up to ``max_batch_size`` texts: one
        ``generate()`` call. It waits up to ``max_wait_ms`` for more only when no rows are
        decoding; everything else taken meanwhile goes back in line, in order."""
        group, size, others = [first], len(first.texts), []
        deadline = time.monotonic() + (self.max_wait_s if wait else 0.0)
        while size < self.max_batch_size:
            item = self._take(deadline - time.monotonic())
            if item is None:
                break
            if (isinstance(item, Job) and item.key == first.key
                    and size + len(item.texts) <= self.max_batch_size):
                group.append(item)
                size += len(item.texts)
                continue
            others.append(item)
            if item is STOP:
                break
        self._carry.extendleft(reversed(others))
        return group

    def _admit(self, rows: _Rows | None, requests: list[Decoding]) -> _Rows:
        """Encode the new texts (those not encoded already) and join them to ``rows`` with an
        empty history: their first decoder step (from the start token) is the next step of the
        whole batch."""
        fresh = [r for r in requests if r.job.encoded is None]
        ready = [r for r in requests if r.job.encoded is not None]
        parts = [r.job.encoded for r in ready]
        if fresh:
            parts.insert(0, self._encode(*self._tokenize([r.job for r in fresh])))
        joined = self._join(rows, fresh + ready, parts[0] if len(parts) == 1 else concat_encoded(parts))
        self.stats["pre_encoded"] += sum(len(r.job.texts) for r in ready)
        return joined

    def _tokenize(self, jobs: list[Job]) -> tuple[Tensor, Tensor]:
        """The jobs' texts as source ids and mask (k, S)."""
        ids: list[list[int]] = []
        for job in jobs:
            ids += self.seq2seq.tokenizer(job.texts, truncation=True,
                                          max_length=job.options.get("max_source_length"))["input_ids"]
        width = max(1, max(len(x) for x in ids))
        source = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        source_mask = torch.zeros(len(ids), width, dtype=torch.bool)
        for i, x in enumerate(ids):
            source[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            source_mask[i, : max(len(x), 1)] = True  # an empty text still has one position
        return source, source_mask

    @torch.inference_mode()
    def _encode(self, source: Tensor, source_mask: Tensor) -> tuple[dict, Tensor, Tensor, Tensor]:
        """Cross-attention keys and values, encoder output (k, S, D), source mask and ids of
        the new texts."""
        device = self.transformer.src_embed.token.weight.device
        source, source_mask = source.to(device), source_mask.to(device)
        memory = self.transformer.encode(source, source_mask).hidden
        cross = {i: layer.cross_attn.memory_kv(memory)
                 for i, layer in enumerate(self.transformer.decoder.layers)}
        return cross, memory, source_mask, source

    @torch.inference_mode()
    def _join(self, rows: _Rows | None, requests: list[Decoding],
              encoded: tuple[dict, Tensor, Tensor, Tensor]) -> _Rows:
        cross, memory, source_mask, source = encoded
        k = source_mask.size(0)
        old = rows if rows is not None else _Rows([], [], [], [], memory.new_zeros(0).long(),
                                                  self._cache, [])
        new = _Rows(
            requests=old.requests + [r for r in requests for _ in r.job.texts],
            slots=old.slots + [i for r in requests for i in range(len(r.job.texts))],
            tokens=old.tokens + [[] for _ in range(k)],
            max_new=old.max_new + [r.job.options["max_new_tokens"] for r in requests
                                   for _ in r.job.texts],
            last=torch.cat([old.last, torch.full((k,), self.start_id, dtype=torch.long,
                                                 device=memory.device)]),
            cache=self._cache,
            samplers=old.samplers + [row_sampler(r.job.options, i, memory.device)
                                     for r in requests for i in range(len(r.job.texts))],
        )
        self._cache.join(cross, memory, source_mask, source)  # last: a failure leaves it as is
        if rows is not None:
            self.stats["joined"] += k
        return new

    @torch.inference_mode()
    def _step(self, rows: _Rows) -> _Rows | None:
        """One decoder step for every running row: its greedy or sampled next token."""
        cache = rows.cache
        memory, source_mask, positions, target_mask = cache.begin_step()
        hidden = self.transformer.decode(rows.last[:, None], memory, source_mask, cache,
                                         positions=positions, target_mask=target_mask).hidden
        cache.advance()
        logits = self.transformer.output(hidden, memory, cache.source(), source_mask)
        last = logits[:, -1]  # (B, V)
        # max(-1).indices: the same first maximal index as argmax(-1), a third of its time
        # on CPU (16 x 8,000 logits: 77 against 219 us, thread time, torch 2.13)
        rows.last = last.max(-1).indices
        sampled = [i for i, sampler in enumerate(rows.samplers) if sampler is not None]
        if sampled:
            at = torch.tensor(sampled, device=last.device)
            rows.last[at] = sample(last[at], [rows.samplers[i] for i in sampled])
        pushed: dict[int, tuple[TokenStream, list[tuple[int, int]]]] = {}
        for request, slot, tokens, token in zip(rows.requests, rows.slots, rows.tokens,
                                                rows.last.tolist()):
            tokens.append(token)
            if request.job.stream is not None:  # this step's tokens, one push per request
                pushed.setdefault(id(request), (request.job.stream, []))[1].append((slot, token))
        for stream, tokens in pushed.values():
            stream.push(tokens)
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(rows)
        return self._retire(rows)

    def _retire(self, rows: _Rows) -> _Rows | None:
        """Answer the rows that are done (EOS, their ``max_new_tokens``, closed by their
        stream, or their client left) and keep the others."""
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
            stream = request.job.stream
            stopped = tokens[-1] in self.eos_ids or (stream is not None and slot in stream.closed)
            if not stopped and len(tokens) < rows.max_new[i]:
                keep.append(i)
                continue
            request.outputs[slot] = self.seq2seq.tokenizer.decode(
                tokens, skip_special_tokens=True).strip()
            request.reasons[slot] = "stop" if stopped else "length"
            request.remaining -= 1
            if request.remaining == 0:
                self._answer(request)
        self.stats["active"] = len(keep)
        if len(keep) == size:
            return rows
        order = rows.cache.keep(keep)  # the running rows, packed into the first slots
        if not order:
            return None
        return _Rows([rows.requests[i] for i in order], [rows.slots[i] for i in order],
                     [rows.tokens[i] for i in order], [rows.max_new[i] for i in order],
                     rows.last[torch.tensor(order, device=rows.last.device)], rows.cache,
                     [rows.samplers[i] for i in order])

    def _answer(self, request: Decoding) -> None:
        outputs = [text or "" for text in request.outputs]
        now = time.monotonic()
        self.stats["texts"] += len(outputs)
        settle(request.job, BatchResult(
            outputs=outputs, output_tokens=self._count_tokens(outputs),
            batch_inputs=request.peak,
            queue_ms=(request.started - request.job.submitted) * 1000.0,
            generate_ms=(now - request.started) * 1000.0,
            finish_reasons=[request.reasons[i] for i in range(len(outputs))],
        ))
