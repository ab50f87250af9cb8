"""Continuous batching: requests join and leave the running batch at every decoding step.

Dynamic batching (`tformer.serving.batching`) runs one ``generate()`` per round: a request that
arrives while a batch is decoding waits for it to end, and every text of a batch waits for the
longest one. Continuous (iteration-level) batching, as in Orca (Yu et al., OSDI 2022), schedules
per step instead. One worker thread owns the running batch and loops:

1. **admit** waiting requests while the batch has room (``max_batch_size`` texts): give them
   free slots, all together: for an encoder-decoder model, encode them and keep their
   cross-attention keys and values, with an empty history; for a decoder-only model, prefill
   their prompts (the history is the prompt);
2. **step**: one decoder step for every running row, each at its own position;
3. **retire** the rows that produced EOS or reached their ``max_new_tokens`` (or whose client
   left): a request is answered as soon as its own texts are done.

A request therefore waits at most one decoder step to start, and never for someone else's longer
output. Rows of different ages share one key/value cache, one slot per row
(`tformer.serving.slot_cache.SlotCache`): each row's history fills the first columns of its
slot, a step writes every row's new column at the row's own position, and the columns past a
row's history are masked (``target_mask``). A new row takes a free slot with an empty history;
a row that leaves frees its slot. Positions are per row (``positions`` of
`tformer.model.Transformer.decode` and `tformer.model.DecoderOnlyTransformer.decode`).

This path is greedy decoding and sampling (temperature, top-k, top-p; each row with its own
random generator, seeded per request: `tformer.serving.sampling`) of tformer's own models: the
encoder-decoder Transformer, with or without copy attention, and the decoder-only one (gpt2 and
llama presets). What differs between the two (how a row is admitted, what a step feeds the
model, how an answer reads) is behind one small object per family
(`tformer.serving.families`); the scheduling here is the same for both. Greedy and sampled
rows share a step. Beam search and n-gram blocking, and Hugging Face models, run through
``generate()`` as whole batches in the same worker, between two steps.

A job submitted as a stream (``stream``: `tformer.serving.batcher.TokenStream`) gets its rows'
new tokens pushed at every step, before its answer; a row its stream closes (its client found a
stop sequence) retires at the next step, as with an end-of-sequence token.

Why by hand: Hugging Face ``generate()`` decodes a fixed batch to its end, and the
serving engines that schedule per step (vLLM, TGI) are built for GPUs and for their own model
code, not for tformer's models.
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

from tformer.serving.batcher import BatcherStopped, BatchResult, TokenLogprob, TokenStream
from tformer.serving.batching import STOP, Call, DynamicBatcher, Job, settle
from tformer.serving.families import Window, family_of
from tformer.serving.sampling import RowSampler, row_sampler, sample, token_logprobs
from tformer.serving.slot_cache import SlotCache, split_encoded

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
    """True for a `tformer.Seq2Seq` holding one of tformer's own models (encoder-decoder, with
    or without copy attention, or decoder-only: `tformer.serving.families.family_of`) whose
    generation config asks for nothing but plain greedy search."""
    if family_of(seq2seq) is None:
        return False
    generation = seq2seq.model.generation_config
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
    #: text index -> its tokens with their log-probabilities (options["logprobs"] set)
    logprobs: dict[int, list[tuple[int, TokenLogprob]]] = field(default_factory=dict)


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
    rooms: list[int]  # steps left in the row's window (`tformer.serving.families.Window`)
    windows: list[Window | None]  # None: the row never slides (its room is its max_new)
    tops: list[int | None]  # alternatives per token whose log-probabilities to keep; None: none
    scored: list[list[tuple[int, TokenLogprob]]]  # the row's tokens with them (tops set)

    def __len__(self) -> int:
        return len(self.slots)

    def take(self, order: list[int]) -> _Rows:
        """Rows ``order``, in that order (the cache already packed so)."""
        return _Rows([self.requests[i] for i in order], [self.slots[i] for i in order],
                     [self.tokens[i] for i in order], [self.max_new[i] for i in order],
                     self.last[torch.tensor(order, dtype=torch.long, device=self.last.device)],
                     self.cache, [self.samplers[i] for i in order],
                     [self.rooms[i] for i in order], [self.windows[i] for i in order],
                     [self.tops[i] for i in order], [self.scored[i] for i in order])


class ContinuousBatcher(DynamicBatcher):
    """`DynamicBatcher`'s queue and the same `tformer.serving.batcher.Batcher` interface, with
    per-step scheduling for greedy and sampled requests to tformer's own models (either
    family); see the module's docstring. Such a request joins the running batch at the next
    step, without waiting for company; ``max_wait_ms`` applies to whole-batch jobs (beam
    search) when nothing decodes. ``stop()`` takes no newcomers and finishes the rows in
    flight."""

    mode = "continuous"

    def __init__(self, seq2seq, *, max_batch_size: int, max_wait_ms: float, max_queue: int) -> None:
        if not supports_continuous(seq2seq):
            raise ValueError("continuous batching drives tformer's own models with plain "
                             "greedy search; this model is "
                             f"{type(getattr(seq2seq, 'model', seq2seq)).__name__} (or its "
                             "generation config adds logits processors)")
        super().__init__(seq2seq, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                         max_queue=max_queue)
        seq2seq.model.eval()  # no dropout, whatever state it was handed over in
        #: What the model's family does its own way (`tformer.serving.families`).
        self.family = family_of(seq2seq)
        self.eos_ids = set(self.family.eos_ids)  # (tests switch end-of-sequence off here)
        #: steps: decoder steps; row_steps: rows decoded over all steps; joined: rows admitted
        #: while others were decoding; pre_encoded: rows admitted already encoded; active: rows
        #: in the running batch after the last step.
        self.stats.update(steps=0, row_steps=0, joined=0, pre_encoded=0, active=0)
        self._cache: SlotCache = self.family.new_cache(max_batch_size)

    def submit_encoded(self, texts: Sequence[str], options: dict[str, Any],
                       encoded: tuple) -> asyncio.Future:
        """As ``submit``, for texts already encoded by :meth:`encode` (in another process, on
        its own copy of the model): the worker only joins them to the running batch."""
        return self._enqueue(list(texts), options, encoded).future

    def encode(self, texts: Sequence[str], options: dict[str, Any]) -> tuple:
        """What admitting ``texts`` to an encoder-decoder model computes before it joins them
        (``family.encodes``): cross-attention keys and values of every layer (one tensor),
        encoder output, source mask and source ids (`tformer.serving.slot_cache.Encoded`; see
        ``submit_encoded``)."""
        return self.encode_together([(texts, options)])[0]

    def encode_together(self, jobs: Sequence[tuple[Sequence[str], dict[str, Any]]]
                        ) -> list[tuple]:
        """``encode`` for several jobs (texts, options) in one encoder pass: one `Encoded` per
        job, each as wide as its own longest source. At the sizes this serves, a pass costs
        little more for 16 texts than for one (its cost is per operation, not per row)."""
        family = self.family
        batch = [Job(list(texts), options, None, None) for texts, options in jobs]
        encoded = family.encode(*family.tokenize(batch))
        return split_encoded(encoded, [len(job.texts) for job in batch])

    def steps(self, texts: Sequence[str], options: dict[str, Any]) -> bool:
        """Whether a job joins the running batch (else it runs whole, through
        ``generate()``): greedy or sampled (`is_stepwise`), fits a batch, and its family can
        decode it per step (an encoder-decoder model's learned positions: within the table)."""
        return (is_stepwise(options) and len(texts) <= self.max_batch_size
                and self.family.steps(list(texts), options))

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

    @torch.inference_mode()
    def _admit(self, rows: _Rows | None, requests: list[Decoding]) -> _Rows:
        """Give the new texts slots (their family's admission: encoding, or prefilling a
        prompt) and join them to ``rows``: their first step is the next step of the whole
        batch. A failure leaves ``rows`` and the cache as they were."""
        requests = sorted(requests, key=lambda r: r.job.encoded is not None)  # to encode first
        entry = self.family.admit(self._cache, [r.job for r in requests])
        old = rows if rows is not None else _Rows([], [], [], [], entry.first[:0], self._cache,
                                                  [], [], [], [], [])
        device = entry.first.device
        new = _Rows(
            requests=old.requests + [r for r in requests for _ in r.job.texts],
            slots=old.slots + [i for r in requests for i in range(len(r.job.texts))],
            tokens=old.tokens + [[] for _ in entry.rooms],
            max_new=old.max_new + [r.job.options["max_new_tokens"] for r in requests
                                   for _ in r.job.texts],
            last=torch.cat([old.last, entry.first]),
            cache=self._cache,
            samplers=old.samplers + [row_sampler(r.job.options, i, device)
                                     for r in requests for i in range(len(r.job.texts))],
            rooms=old.rooms + entry.rooms,
            windows=old.windows + entry.windows,
            tops=old.tops + [r.job.options.get("logprobs") for r in requests for _ in r.job.texts],
            scored=old.scored + [[] for _ in entry.rooms],
        )
        if rows is not None:
            self.stats["joined"] += len(entry.rooms)
        self.stats["pre_encoded"] += sum(len(r.job.texts) for r in requests
                                         if r.job.encoded is not None)
        return new

    @torch.inference_mode()
    def _step(self, rows: _Rows) -> _Rows | None:
        """One decoder step for every running row: its greedy or sampled next token."""
        cache = rows.cache
        positions, target_mask = cache.begin_step()
        last = self.family.logits(cache, rows.last, positions, target_mask)  # (B, V)
        cache.advance()
        # max(-1).indices: the same first maximal index as argmax(-1), a third of its time
        # on CPU (16 x 8,000 logits: 77 against 219 us, thread time, torch 2.13)
        rows.last = last.max(-1).indices
        sampled = [i for i, sampler in enumerate(rows.samplers) if sampler is not None]
        if sampled:
            at = torch.tensor(sampled, device=last.device)
            rows.last[at] = sample(last[at], [rows.samplers[i] for i in sampled])
        scores = self._score(rows, last)
        pushed: dict[int, tuple[TokenStream, list[tuple]]] = {}
        for i, (request, slot, tokens, token) in enumerate(zip(rows.requests, rows.slots,
                                                               rows.tokens, rows.last.tolist())):
            tokens.append(token)
            entry = (slot, token) if i not in scores else (slot, token, scores[i])
            if i in scores:
                rows.scored[i].append((token, scores[i]))
            if request.job.stream is not None:  # this step's tokens, one push per request
                pushed.setdefault(id(request), (request.job.stream, []))[1].append(entry)
        for stream, tokens in pushed.values():
            stream.push(tokens)
        rows.rooms = [room - 1 for room in rows.rooms]
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(rows)
        return self._slide(self._retire(rows))

    def _score(self, rows: _Rows, logits: Tensor) -> dict[int, TokenLogprob]:
        """The log-probabilities of this step's tokens, for the rows that asked."""
        asked = [i for i, top in enumerate(rows.tops) if top is not None]
        if not asked:
            return {}
        at = torch.tensor(asked, device=logits.device)
        return dict(zip(asked, token_logprobs(logits[at], rows.last[at],
                                              [rows.tops[i] for i in asked])))

    def _slide(self, rows: _Rows | None) -> _Rows | None:
        """New windows for the running rows whose window is used up (decoder-only rows
        continued past their context: `tformer.serving.families.Window`)."""
        full = [] if rows is None else [i for i, room in enumerate(rows.rooms) if room == 0]
        if full:
            rooms = self.family.slide(rows.cache, full, [rows.windows[i] for i in full],
                                      [rows.tokens[i] for i in full],
                                      [rows.max_new[i] for i in full])
            for i, room in zip(full, rooms):
                rows.rooms[i] = room
        return rows

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
            request.outputs[slot] = self.family.text(tokens)
            if rows.tops[i] is not None:
                request.logprobs[slot] = rows.scored[i]
            request.reasons[slot] = "stop" if stopped else "length"
            request.remaining -= 1
            if request.remaining == 0:
                self._answer(request)
        self.stats["active"] = len(keep)
        if len(keep) == size:
            return rows
        order = rows.cache.keep(keep)  # the running rows, packed into the first slots
        return rows.take(order) if order else None

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
            logprobs=([request.logprobs[i] for i in range(len(outputs))]
                      if request.logprobs else None),
        ))
