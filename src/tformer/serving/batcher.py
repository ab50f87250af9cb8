"""The one interface every batcher implements, and what it hands back.

The app (`tformer.serving.app`) is written against `Batcher` only; a batcher is chosen by
`tformer.serving.app.make_batcher`:

- `tformer.serving.batching.DynamicBatcher`: one ``generate()`` per batch of requests that
  arrived together;
- `tformer.serving.continuous.ContinuousBatcher`: requests join and leave the running batch at
  every decoder step;
- `tformer.serving.process.ProcessBatcher`: either of them in a child process of its own.

Each one owns the model: a single worker (thread or process) runs it, and the event loop only
queues jobs and awaits their futures.

A job is submitted whole (``submit``: a future of its `BatchResult`) or as a stream
(``stream``: a `TokenStream`, which also hands over the tokens as they are decoded). What a
stream carries depends on the batcher: the continuous batcher pushes every row's token at every
decoder step, in the server's process or in a process of its own; the dynamic batcher (and any
job that runs through ``generate()``: beam search, too many texts for one batch) pushes
nothing, and its stream ends with the result, the whole text at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


class QueueFull(Exception):
    """More texts are waiting than ``max_queue`` allows."""


class BatcherStopped(Exception):
    """The worker is not running (server shutting down). ``code``: the API's error code."""

    code = "shutting_down"


class WorkerDown(BatcherStopped):
    """The worker has died (the batcher's process ended): nothing more can be decoded."""

    code = "worker_down"


@dataclass(frozen=True)
class BatchResult:
    """What one job gets back from the worker."""

    outputs: list[str]
    output_tokens: list[int] | None
    batch_inputs: int  # texts in the generate() call (or decoder step) that produced them
    queue_ms: float
    generate_ms: float
    #: Per text, why its decoding ended: "stop" (end of sequence, or its stream closed it),
    #: "length" (``max_new_tokens``); None where the batcher cannot tell (``generate()``).
    finish_reasons: list[str] | None = None


class TokenStream:
    """A job's tokens as the worker decodes them, then its result (`Batcher.stream`).

    The worker calls :meth:`push` (from its thread) with each step's new tokens, as
    ``[(text index, token id), ...]``; the event loop reads them, in order, with :meth:`events`,
    which ends when the job is done: ``future`` then holds its `BatchResult` (or its error).
    Every push is delivered before the future settles (both go through the loop's queue of
    callbacks, in order). :meth:`close` says a text needs no more tokens (its client found a
    stop sequence): the continuous batcher retires its row at the next step. Cancelling
    ``future`` drops the whole job, as for ``submit``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.closed: set[int] = set()  # read by the worker thread (a set's add is atomic)
        #: Set by a batcher that relays the stream elsewhere (`tformer.serving.process`):
        #: called on the loop with each push instead of queueing it, and with each close.
        self.sink: Callable[[list[tuple[int, int]]], None] | None = None
        self.on_close: Callable[[int], None] | None = None
        self._queue: asyncio.Queue = asyncio.Queue()

    def push(self, tokens: list[tuple[int, int]]) -> None:
        """Worker side (any thread): hand over one step's new tokens."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, tokens)
        except RuntimeError:  # the loop is closed: nobody is reading any more
            pass

    def _deliver(self, tokens: list[tuple[int, int]]) -> None:
        if self.sink is not None:
            self.sink(tokens)
        else:
            self._queue.put_nowait(tokens)

    def close(self, index: int) -> None:
        """Text ``index`` needs no more tokens (the others go on)."""
        self.closed.add(index)
        if self.on_close is not None:
            self.on_close(index)

    def cancel(self) -> None:
        self.future.cancel()

    async def events(self) -> AsyncIterator[list[tuple[int, int]]]:
        """Each push, in order, until the job is done (then read ``future``)."""
        while True:
            if not self._queue.empty():
                yield self._queue.get_nowait()
                continue
            if self.future.done():
                return
            getter = asyncio.ensure_future(self._queue.get())
            try:
                await asyncio.wait({getter, self.future}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()


@runtime_checkable
class Batcher(Protocol):
    """Generation requests in, `BatchResult` futures out, one worker owning the model.

    Attributes:
        mode: ``"continuous"`` or ``"dynamic"`` (what ``ServeSettings.batching`` resolved to).
        stats: counters for tests, benchmarks and logs (``rounds``, ``generate_calls``,
            ``texts``, ``largest_batch``, ``dropped``, ``failed``; the continuous batcher adds
            ``steps``, ``row_steps``, ``joined``, ``pre_encoded``).
    """

    mode: str
    stats: dict[str, Any]

    def start(self) -> None:
        """Start the worker (idempotent); `BatcherStopped` once stopped."""
        ...

    @property
    def healthy(self) -> bool:
        """False once a started worker has ended (stopped, or died)."""
        ...

    def submit(self, texts: Sequence[str], options: dict[str, Any]) -> asyncio.Future:
        """Queue ``texts`` to generate with ``options`` (``max_new_tokens`` included): a future
        of the running loop resolving to a `BatchResult`; cancel it to drop the job. Raises
        `QueueFull` past ``max_queue`` and `BatcherStopped` once stopped."""
        ...

    def stream(self, texts: Sequence[str], options: dict[str, Any]) -> TokenStream:
        """As ``submit``, with the tokens handed over as they are decoded (see `TokenStream`;
        a batcher that cannot stream per token pushes nothing and ends with the result)."""
        ...

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run ``fn()`` where the model may be used (between batches), e.g. attention maps."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is in flight, fail what still waits with `BatcherStopped`, end the
        worker."""
        ...


def settle_future(future: asyncio.Future, loop: asyncio.AbstractEventLoop, result: Any = None,
                  error: BaseException | None = None) -> None:
    """Resolve ``future`` of ``loop`` from another thread; a future already done (cancelled by
    a timeout or a disconnect) is left alone, and so is a loop that has closed."""

    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
