"""Dynamic batching: requests that arrive together share one ``generate()`` call.

`DynamicBatcher` implements `tformer.serving.batcher.Batcher`. One worker thread owns the
model: it is the only caller of ``seq2seq.generate`` and of anything else that runs the model
(attention maps go through :meth:`DynamicBatcher.call`), so no two forward passes ever race on
it. The event loop only queues jobs and awaits their futures.

A round of the worker:

1. take the oldest waiting job (block until there is one);
2. gather more until the round holds ``max_batch_size`` texts or ``max_wait_ms`` have passed
   since the round started. The window counts from the round's start, not from the first
   job's arrival: with clients that send their next request as soon as they have an answer,
   a window that had already expired for the jobs queued behind a running batch would run
   them at once, without the clients just answered, and the clients would split into two
   cohorts taking turns with half batches for good;
3. drop the jobs whose future is already cancelled (client gone, timed out): they take no room;
4. group the rest by generation options, in arrival order (texts decoded with different options
   must never share a call), and run one ``generate()`` per group;
5. hand each job its slice of the outputs through ``loop.call_soon_threadsafe``. A future
   cancelled meanwhile is skipped: a client that leaves never breaks the batch for the others.

A job that would overflow the round waits for the next one, first in line. A single request
larger than ``max_batch_size`` runs alone, chunked by ``generate()`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tformer.serving.batcher import (
    BatcherStopped,
    BatchResult,
    QueueFull,
    TokenStream,
    settle_future,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """A request's texts waiting for the worker, with their options and the future to settle.
    (Shared with `tformer.serving.continuous`, which schedules the same jobs per step.)"""

    texts: list[str]
    options: dict[str, Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.monotonic)
    #: The texts already encoded (`ContinuousBatcher.encode`), by a server whose batcher runs
    #: in another process; None: the worker encodes them.
    encoded: tuple | None = None
    #: Where the continuous batcher hands over tokens as they are decoded (``stream``); its
    #: ``future`` is this job's.
    stream: TokenStream | None = None

    @property
    def key(self) -> tuple:
        """Jobs of equal keys may share a ``generate()`` call. A seeded job shares with none:
        a sample drawn in a batch depends on the batch."""
        key = tuple(sorted(self.options.items()))
        return key + (id(self),) if self.options.get("seed") is not None else key


@dataclass(eq=False)
class Call:
    """Something else to run with the model in the worker (`DynamicBatcher.call`)."""

    fn: Callable[[], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


#: Queued by ``stop()``: the worker ends when it takes it.
STOP = object()


def settle(item: Job | Call, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve an item's future from the worker thread (`settle_future`)."""
    settle_future(item.future, item.loop, result, error)


class DynamicBatcher:
    """Gathers concurrent generation requests into batches run by one worker thread (a
    `tformer.serving.batcher.Batcher`).

    Args:
        seq2seq: anything with ``.generate(texts, max_new_tokens=..., batch_size=..., **options)
            -> list[str]`` (`tformer.Seq2Seq`, or another engine with the same interface) and,
            optionally, ``.tokenizer`` (used to count output tokens).
        max_batch_size: most texts in one ``generate()`` call.
        max_wait_ms: how long a round waits for more jobs once it has one (less when full).
        max_queue: most texts waiting; :meth:`submit` raises `QueueFull` past it.
    """

    mode = "dynamic"  # ServeSettings.batching

    def __init__(self, seq2seq, *, max_batch_size: int, max_wait_ms: float, max_queue: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.seq2seq = seq2seq
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()
        self._carry: deque = deque()  # jobs that did not fit the last round; worker-only
        self._lock = threading.Lock()
        #: Whose futures it hands out: None, the caller's running event loop; the batcher's
        #: process (`tformer.serving.process`) sets one that settles them on the spot.
        self.loop: asyncio.AbstractEventLoop | None = None
        #: False: answers leave ``output_tokens`` None, for a caller that counts them itself
        #: (the batcher's process: the server's process counts, off the decoding core).
        self.counts_tokens = True
        self._waiting = 0  # texts queued, not yet taken by a round
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: Counters for tests, benchmarks and logs (written by the worker only).
        self.stats = {"rounds": 0, "generate_calls": 0, "texts": 0, "largest_batch": 0,
                      "dropped": 0, "failed": 0}

    # -- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._lock:
            if self._stopping:
                raise BatcherStopped("the batcher has been stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tformer-batcher",
                                                daemon=True)
                self._thread.start()

    @property
    def healthy(self) -> bool:
        """False once a started worker has ended (stopped, or died)."""
        return self._thread is None or self._thread.is_alive()

    def submit(self, texts: Sequence[str], options: dict[str, Any]) -> asyncio.Future:
        """Queue texts to generate with ``options`` (must include ``max_new_tokens``); the
        returned future (of the running loop) resolves to a `BatchResult`. Cancel it to drop
        the job."""
        return self._enqueue(list(texts), options).future

    def stream(self, texts: Sequence[str], options: dict[str, Any]) -> TokenStream:
        """As ``submit``, as a `TokenStream`. This batcher decodes a batch in one
        ``generate()`` call: it pushes no tokens, and the stream ends with the result."""
        return self._enqueue(list(texts), options, stream=True).stream

    def relay(self, texts: Sequence[str], options: dict[str, Any],
              sink: Callable[[list[tuple]], None], encoded: tuple | None = None) -> TokenStream:
        """As ``stream`` (``encoded``: texts already encoded, as ``submit_encoded`` takes
        them), each push handed to ``sink`` (its `TokenStream.sink`), which is set before the
        worker can see the job (the batcher's process relays tokens from the worker's thread)."""
        return self._enqueue(list(texts), options, encoded, stream=True, sink=sink).stream

    def _enqueue(self, texts: list[str], options: dict[str, Any], encoded: tuple | None = None,
                 stream: bool = False, sink: Callable[[list[tuple]], None] | None = None) -> Job:
        self.start()
        loop = self.loop or asyncio.get_running_loop()
        tokens = TokenStream(loop) if stream else None
        if tokens is not None:
            tokens.sink = sink
        job = Job(texts, dict(options), tokens.future if tokens else loop.create_future(), loop,
                  encoded=encoded, stream=tokens)
        with self._lock:  # under the lock: never queued behind stop()'s last call
            if self._stopping:
                raise BatcherStopped("the batcher has been stopped")
            if self._waiting + len(texts) > self.max_queue:
                raise QueueFull(f"{self._waiting} texts are already waiting; the limit "
                                f"max_queue is {self.max_queue}")
            self._waiting += len(texts)
            self._queue.put(job)
        return job

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run ``fn()`` in the worker thread, between batches (for other uses of the model)."""
        self.start()
        loop = asyncio.get_running_loop()
        item = Call(fn, loop.create_future(), loop)
        with self._lock:
            if self._stopping:
                raise BatcherStopped("the batcher has been stopped")
            self._queue.put(item)
        return item.future

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the round in progress, fail whatever still waits, and end the worker."""
        with self._lock:
            self._stopping = True
            thread = self._thread
            if thread is not None:
                self._queue.put(STOP)  # after every job queued before the flag was set
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the batcher's worker did not stop within %.0f s", timeout)

    # -- worker side -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            round_ = self._next_round()
            if round_[0] is STOP:
                break
            try:
                if isinstance(round_[0], Call):
                    self._run_call(round_[0])
                else:
                    self._run_round(round_)
            except Exception:  # a bug here must not kill the only worker
                log.exception("batcher round failed")
        for item in [*self._carry, *self._drain()]:
            if item is not STOP:
                settle(item, error=BatcherStopped("the server is shutting down"))

    def _drain(self) -> list:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _take(self, timeout: float | None) -> Any:
        """The next live item: a carried-over one first, else from the queue (None once
        ``timeout`` has passed). Jobs cancelled while they waited are dropped here, so they
        take no room in a batch."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._carry:
                item = self._carry.popleft()
            else:
                try:
                    if deadline is None:
                        item = self._queue.get()
                    else:
                        left = deadline - time.monotonic()
                        item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    return None
            if not (isinstance(item, Job) and item.future.cancelled()):
                return item
            self._drop([item])

    def _drop(self, jobs: list[Job]) -> None:
        with self._lock:
            self._waiting -= sum(len(job.texts) for job in jobs)
        self.stats["dropped"] += len(jobs)

    def _next_round(self) -> list:
        first = self._take(None)
        if not isinstance(first, Job):
            return [first]
        round_, size = [first], len(first.texts)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch_size:
            item = self._take(deadline - time.monotonic())
            if item is None:
                break
            if not isinstance(item, Job) or size + len(item.texts) > self.max_batch_size:
                self._carry.appendleft(item)  # next round starts with it
                break
            round_.append(item)
            size += len(item.texts)
        return round_

    def _run_call(self, item: Call) -> None:
        if item.future.cancelled():
            return
        try:
            settle(item, item.fn())
        except Exception as error:
            settle(item, error=error)

    def _run_round(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.future.cancelled()]  # cancelled while gathering
        self._drop([job for job in jobs if job.future.cancelled()])
        with self._lock:
            self._waiting -= sum(len(job.texts) for job in live)
        self.stats["rounds"] += 1
        groups: dict[tuple, list[Job]] = {}
        for job in live:
            groups.setdefault(job.key, []).append(job)
        for group in groups.values():
            self._run_group(group)

    def _run_group(self, jobs: list[Job]) -> None:
        texts = [text for job in jobs for text in job.texts]
        options = dict(jobs[0].options)
        seed = options.pop("seed", None)
        started = time.monotonic()
        try:
            with seeded(seed, getattr(self.seq2seq, "model", None)):
                outputs = self.seq2seq.generate(texts, batch_size=self.max_batch_size, **options)
            counts = self._count_tokens(outputs)
        except Exception as error:
            log.exception("generate() failed on a batch of %d texts", len(texts))
            self.stats["failed"] += len(jobs)
            for job in jobs:
                settle(job, error=error)
            return
        generate_ms = (time.monotonic() - started) * 1000.0
        self.stats["generate_calls"] += 1
        self.stats["texts"] += len(texts)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(texts))
        log.debug("generated %d texts from %d requests in %.1f ms", len(texts), len(jobs),
                  generate_ms)
        start = 0
        for job in jobs:
            end = start + len(job.texts)
            settle(job, BatchResult(
                outputs=list(outputs[start:end]),
                output_tokens=None if counts is None else counts[start:end],
                batch_inputs=len(texts),
                queue_ms=(started - job.submitted) * 1000.0,
                generate_ms=generate_ms,
            ))
            start = end

    def _count_tokens(self, outputs: list[str]) -> list[int] | None:
        # The worker thread is the only user of the model's tokenizer: Hugging Face fast
        # tokenizers are not safe to call from two threads at once ("Already borrowed").
        tokenizer = getattr(self.seq2seq, "tokenizer", None)
        if tokenizer is None or not outputs or not self.counts_tokens:
            return None
        return [len(ids) for ids in tokenizer(list(outputs), add_special_tokens=False)["input_ids"]]


@contextlib.contextmanager
def seeded(seed: int | None, model=None):
    """With a seed: torch's random generators seeded with it inside, and put back as they were
    after (the server's other users of them see no change). A no-op without a seed."""
    if seed is None:
        yield
        return
    devices = []
    if isinstance(model, torch.nn.Module):
        devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed % 2**64)
        yield
