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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
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
