"""The batcher in a process of its own, so that decoding and HTTP do not share one GIL.

With the batcher in the server's process, every decoder step, every admission and every HTTP
request (parsing, validation, JSON, futures) take turns on one interpreter lock: under 16
clients the server used one core of two (``docs/benchmarks.md``). `ProcessBatcher` (a
`tformer.serving.batcher.Batcher` like the batchers it runs) keeps the HTTP side in the
server's process and moves the batcher (`ContinuousBatcher` or `DynamicBatcher`, unchanged)
into a child process, a fresh interpreter (running `child_main`) on one end of a socket pair:

- the parent sends ``("job", id, texts, options, encoded)`` and ``("cancel", id)`` down the
  pipe, from one sender thread (a send never blocks the event loop). A job for the
  continuous path of an encoder-decoder model is encoded in the parent first, together with
  the jobs that came meanwhile (`ContinuousBatcher.encode_together`: one encoder pass and the
  cross-attention keys and values), so the child's core only joins and decodes: admitting a
  newcomer (an encoder pass) cost about as much as a one-row decoder step and, under 16
  clients, a quarter of the batcher's time. (A
  decoder-only model's prompts are prefilled in the child, whose cache holds their keys and
  values: nothing is computed ahead for them.);
- the child's main thread reads the pipe and submits each job to its batcher; the batcher's
  worker thread sends ``("done", id, result, error, stats)`` back itself when it settles the
  job (`_AtOnce`: no event loop in the child);
- a reader thread in the parent counts the answer's output tokens and settles the waiting
  request's future.

A streamed job (``stream``) is sent as ``("stream", ...)``: the child relays each step's tokens
as ``("tokens", id, tokens)``, before its ``done``, and the parent pushes them into the
request's `tformer.serving.batcher.TokenStream`; a text the parent's stream closes (a stop
sequence) is sent down as ``("close", id, index)``.

The model is handed to the child pickled, so a model built in memory is served the same way as
a checkpoint (a copy per process: for the small models this is for, a few MB to a few hundred).
The parent's uses of its own copy (encoding, attention maps: :meth:`ProcessBatcher.call`) run
in one thread of their own, one at a time.

If the child dies, every waiting request fails with `WorkerDown` (503 ``worker_down``), later
ones too, and ``healthy`` turns false (``/healthz`` answers 503), as with a dead worker thread.
The child ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group): it ends when
the parent says ``stop`` after uvicorn's graceful shutdown, or when the parent's end closes.

``max_queue`` here counts the texts sent to the child and not yet answered, those decoding
included (in the server's process it counts the texts waiting for the worker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

import tformer
from tformer.serving.batcher import (
    BatcherStopped,
    QueueFull,
    TokenStream,
    WorkerDown,
    settle_future,
)
from tformer.serving.batching import DynamicBatcher
from tformer.serving.continuous import ContinuousBatcher
from tformer.serving.limits import TokenCounter

log = logging.getLogger(__name__)

#: Seconds the child may take to import torch, unpickle the model and say it is ready.
START_TIMEOUT_S = 300.0


class ProcessBatcher:
    """The `tformer.serving.batcher.Batcher` interface over a batcher of kind ``kind``
    ("continuous" or "dynamic") run in a child process. ``max_queue`` is enforced here, before
    anything crosses the pipe."""

    def __init__(self, seq2seq, *, kind: str, max_batch_size: int, max_wait_ms: float,
                 max_queue: int) -> None:
        cls = ContinuousBatcher if kind == "continuous" else DynamicBatcher
        # Built here too (a model the batcher cannot drive fails now, in this process, with the
        # batcher's own message). Never started: a continuous one encodes the texts here.
        local = cls(seq2seq, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                    max_queue=max_queue)
        self._encoder = local if kind == "continuous" else None
        self.mode = kind
        self.seq2seq = seq2seq
        self.max_queue = max_queue
        self._options = dict(kind=kind, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
        self._lock = threading.Lock()  # the state below, and the order of messages queued
        #: job id -> (future, its loop, texts, its stream or None)
        self._pending: dict[int, tuple[asyncio.Future, asyncio.AbstractEventLoop, int,
                                       TokenStream | None]] = {}
        self._sent: set[int] = set()  # pending jobs whose message is queued for the child
        self._waiting = 0  # texts of the pending jobs
        self._ids = itertools.count()
        self._stopping = False
        self._ended = False  # the reader has seen the pipe close: no answer can come any more
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._outbox: queue.Queue = queue.Queue()  # messages for the child, sent in order
        #: continuous jobs to encode here: (id, kind, texts, options), in arrival order
        self._to_encode: list[tuple[int, str, list[str], dict[str, Any]]] = []
        self._threads: list[threading.Thread] = []  # the sender and the reader
        # This process's uses of the model (encoding, attention maps), one at a time: the model's
        # tokenizer fails when two threads call it at once.
        self._model_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tformer-model")
        #: The child batcher's counters, as of its last answer.
        self.stats: dict[str, Any] = {}
        #: Counts output tokens in the reader thread, with its own copy of the tokenizer (the
        #: model thread encodes with the model's); None: a model without a tokenizer.
        tokenizer = getattr(seq2seq, "tokenizer", None)
        self._counter = TokenCounter(tokenizer) if tokenizer is not None else None

    # -- parent side -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the child and wait until its model is loaded (idempotent)."""
        with self._lock:
            if self._stopping:
                raise BatcherStopped("the batcher has been stopped")
            if self._process is not None:
                return
            process, conn = _spawn()
            try:
                _put(conn, (self.seq2seq, self._options))
                if not conn.poll(START_TIMEOUT_S):
                    raise RuntimeError(f"it did not start within {START_TIMEOUT_S:g} s")
                message = _get(conn)
                if message[0] != "ready":
                    raise RuntimeError(message[1])
            except (Exception, EOFError) as error:
                conn.close()
                process.kill()
                code = process.wait()
                text = str(error) or f"it exited with code {code}; its error is in the log above"
                raise RuntimeError(f"the batcher's process failed to start: {text}") from None
            self._process, self._conn, self.stats = process, conn, message[1]
            self._threads = [threading.Thread(target=target, name=name, daemon=True)
                             for target, name in ((self._write, "tformer-batcher-sender"),
                                                  (self._read, "tformer-batcher-reader"))]
            for thread in self._threads:
                thread.start()

    @property
    def healthy(self) -> bool:
        """False once a started child has ended (stopped, or died)."""
        return self._process is None or (self._process.poll() is None and not self._ended)

    def submit(self, texts: Sequence[str], options: dict[str, Any]) -> asyncio.Future:
        """As `DynamicBatcher.submit`: a future of the running loop that resolves to a
        `BatchResult`; cancel it to drop the job (the child is told)."""
        return self._submit(texts, options, None)

    def stream(self, texts: Sequence[str], options: dict[str, Any]) -> TokenStream:
        """As ``submit``, as a `TokenStream`: the child relays its batcher's tokens (a
        continuous one's at every step; a dynamic one pushes none)."""
        stream = TokenStream(asyncio.get_running_loop())
        self._submit(texts, options, stream)
        return stream

    def _submit(self, texts: Sequence[str], options: dict[str, Any],
                stream: TokenStream | None) -> asyncio.Future:
        texts, options = list(texts), dict(options)
        self.start()
        loop = asyncio.get_running_loop()
        future = stream.future if stream is not None else loop.create_future()
        kind = "job" if stream is None else "stream"
        # (a decoder-only model's admission, its prompt's prefill, runs in the child)
        encode = (self._encoder is not None and self._encoder.family.encodes
                  and self._encoder.steps(texts, options))
        with self._lock:
            if self._stopping:
                raise BatcherStopped("the batcher has been stopped")
            if self._ended:
                raise WorkerDown("the model's process has ended")
            if self._waiting + len(texts) > self.max_queue:
                raise QueueFull(f"{self._waiting} texts are already waiting; the limit "
                                f"max_queue is {self.max_queue}")
            job = next(self._ids)
            self._pending[job] = (future, loop, len(texts), stream)
            self._waiting += len(texts)
            if encode:  # encoded with the others waiting (`_encode_waiting`)
                self._to_encode.append((job, kind, texts, options))
                self._model_thread.submit(self._encode_waiting)
            else:  # the child runs it whole (generate()), encoder included
                self._queue_job(job, (kind, job, texts, options, None))
        future.add_done_callback(functools.partial(self._cancelled, job))
        if stream is not None:
            stream.on_close = functools.partial(self._close, job)
        return future

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run ``fn()`` in this process, in the thread that owns its copy of the model, one
        call at a time (for other uses of the model, e.g. attention maps)."""
        with self._lock:
            if self._stopping:
                raise BatcherStopped("the batcher has been stopped")
            return asyncio.wrap_future(self._model_thread.submit(fn))

    def stop(self, timeout: float = 10.0) -> None:
        """Let the child answer the jobs it holds, then end it (killed after ``timeout``
        seconds); jobs it does not answer, and jobs not sent yet, fail with `BatcherStopped`."""
        with self._lock:
            self._stopping = True
            process = self._process
            self._model_thread.shutdown(wait=False, cancel_futures=True)
            if process is not None:
                self._outbox.put(("stop",))
                self._outbox.put(None)  # the sender's end
        if process is None:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the batcher's process did not stop within %.0f s; killing it", timeout)
            process.kill()
            process.wait()
        for thread in self._threads:
            thread.join(5)
        self._conn.close()
        self._fail_pending(BatcherStopped("the server is shutting down"))

    def _queue_job(self, job: int, message: tuple) -> None:
        """Under ``_lock``: the job's message goes out before any cancel of it."""
        self._sent.add(job)
        self._outbox.put(message)

    def _close(self, job: int, index: int) -> None:
        with self._lock:
            if job in self._sent:
                self._outbox.put(("close", job, index))

    def _encode_waiting(self) -> None:
        """Encode the continuous jobs waiting here (those not cancelled meanwhile, up to a
        batch of texts) in one encoder pass and send them, so that the child only joins and
        decodes them: the encoder runs on this process's core, beside the child's decoding.
        Each job queues one call of this; a call finding nothing left returns. One pass for the
        jobs that came together, rather than one each: a pass costs per operation more than per
        text, and under 16 clients the encoding took half of this process's CPU time (requests
        then come about one per decoder step, so most passes still hold one; bursts share)."""
        with self._lock:
            waiting = [entry for entry in self._to_encode if entry[0] in self._pending]
            size, count = 0, 0
            for entry in waiting:
                if count and size + len(entry[2]) > self._options["max_batch_size"]:
                    break
                size, count = size + len(entry[2]), count + 1
            jobs, self._to_encode = waiting[:count], waiting[count:]
        if jobs:
            self._encode_and_send(jobs)

    def _encode_and_send(self, jobs: list[tuple[int, str, list[str], dict[str, Any]]]) -> None:
        """Encode ``jobs`` (id, kind, texts, options) together and queue them for the child;
        if that fails, each alone, so that only the requests at fault get the error."""
        try:
            encoded = self._encoder.encode_together([(texts, options)
                                                     for _, _, texts, options in jobs])
            packed = [pack_encoded(x) for x in encoded]
        except Exception as error:
            if len(jobs) > 1:
                log.debug("encoding %d requests together failed (%s); encoding each alone",
                          len(jobs), error)
                for job in jobs:
                    if job[0] in self._pending:  # (not those cancelled meanwhile)
                        self._encode_and_send([job])
                return
            log.exception("encoding a request failed")
            self._settle(jobs[0][0], None, error)
            return
        with self._lock:
            for (job, kind, texts, options), message in zip(jobs, packed):
                if job in self._pending:  # else cancelled while it was encoded: not sent
                    self._queue_job(job, (kind, job, texts, options, message))

    def _cancelled(self, job: int, future: asyncio.Future) -> None:
        if not future.cancelled():
            return
        with self._lock:  # the client is answered already: forget the job here
            entry = self._pending.pop(job, None)
            if entry is not None:
                self._waiting -= entry[2]
            if job in self._sent:
                self._sent.discard(job)
                self._outbox.put(("cancel", job))

    def _write(self) -> None:
        """The sender thread: messages to the child in order, until ``None`` or a failure."""
        while (message := self._outbox.get()) is not None:
            try:
                _put(self._conn, message)
            except OSError:
                return  # the child is gone: the reader fails what is pending
            except Exception as error:  # a message that does not pickle (say, an option)
                log.exception("a message could not be sent to the batcher's process")
                if message[0] in ("job", "stream"):
                    self._settle(message[1], None, error)

    def _read(self) -> None:
        """The reader thread: settle each answered job; when the pipe closes (or anything
        breaks here), fail the rest and refuse new jobs."""
        counter = self._counter
        try:
            while True:
                try:
                    message = _get(self._conn)
                except (EOFError, OSError):
                    break
                except Exception:  # an answer that does not unpickle
                    log.exception("an answer from the batcher's process could not be read")
                    continue
                if message[0] == "done":
                    _, job, result, error, stats = message
                    self.stats = stats
                    if result is not None and counter is not None and result.outputs:
                        # counted here, beside the child's decoding: ~3% of its time under
                        # 16 clients
                        try:
                            result = dataclasses.replace(
                                result, output_tokens=counter.count(result.outputs,
                                                                    special=False))
                        except Exception:  # the answer goes out without its counts
                            log.exception("counting an answer's output tokens failed")
                    self._settle(job, result, error)
                elif message[0] == "tokens":
                    entry = self._pending.get(message[1])
                    if entry is not None and entry[3] is not None:
                        entry[3].push(message[2])
        finally:
            with self._lock:  # from here on, submit() refuses: nothing sent would be answered
                self._ended = True
                stopping = self._stopping
            if not stopping:
                log.error("the batcher's process ended (exit code %s)", self._process.poll())
            self._fail_pending(BatcherStopped("the server is shutting down") if stopping
                               else WorkerDown("the model's process has ended"))

    def _settle(self, job: int, result: Any, error: BaseException | None) -> None:
        with self._lock:
            entry = self._pending.pop(job, None)
            self._sent.discard(job)
            if entry is not None:
                self._waiting -= entry[2]
        if entry is not None:
            settle_future(entry[0], entry[1], result, error)

    def _fail_pending(self, error: BatcherStopped) -> None:
        with self._lock:
            pending, self._pending, self._waiting = self._pending, {}, 0
            self._sent.clear()
            self._to_encode.clear()
        for future, loop, *_ in pending.values():
            settle_future(future, loop, None, error)


def pack_encoded(encoded: tuple) -> tuple:
    """An encoded job as four numpy arrays: unpickling tensors goes through ``torch.load``
    once per tensor, which cost the child 14% of its time under 16 clients; numpy arrays
    unpickle as plain buffers. (float32 on the way: numpy has no bfloat16.)"""
    kv, memory, source_mask, source_ids = encoded  # kv: (L, 2, k, H, S, Dh)
    return (kv.float().cpu().numpy(), memory.float().cpu().numpy(), source_mask.cpu().numpy(),
            source_ids.cpu().numpy())


def unpack_encoded(packed: tuple, device: torch.device, dtype: torch.dtype) -> tuple:
    """What `pack_encoded` packed, as `ContinuousBatcher.submit_encoded` takes it, on
    ``device`` in ``dtype``."""
    kv, memory = (torch.from_numpy(x).to(device, dtype) for x in packed[:2])
    source_mask, source_ids = (torch.from_numpy(x).to(device) for x in packed[2:])
    return kv, memory, source_mask, source_ids


def _put(conn: Connection, message: Any) -> None:
    """Plain pickle, tensors by value: ``Connection.send`` would share tensors through
    torch.multiprocessing's reductions, which only work with multiprocessing's own children."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _get(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


# -- child side ----------------------------------------------------------------------------


def _spawn() -> tuple[subprocess.Popen, Connection]:
    """A fresh interpreter running `_child` (so nothing of this process's threads or locks is
    inherited, and no caller's ``__main__`` is re-imported, as multiprocessing's spawn would
    do), talking over one end of a socket pair. The directory this package was imported from
    is appended to the child's path, a fallback for a checkout that is not installed."""
    ours, theirs = socket.socketpair()
    root = str(Path(tformer.__file__).resolve().parents[1])
    code = (f"import sys; sys.path.append({root!r}); "
            "from tformer.serving.process import child_main; child_main()")
    process = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())],
                               pass_fds=[theirs.fileno()])
    theirs.close()
    return process, Connection(ours.detach())


def child_main() -> None:
    """The entry point of the child `_spawn` starts (its socket's descriptor in argv[1])."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for number in (signal.SIGINT, signal.SIGTERM):  # the parent says when to stop
        signal.signal(number, signal.SIG_IGN)
    _child(Connection(int(sys.argv[1])))


def _picklable(error: BaseException) -> BaseException:
    """``error`` if it survives a pickle round trip, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class _Future:
    """What the child's batcher hands out instead of an asyncio future: settled in the thread
    that settles it (the worker), its callbacks run there and then. The subset of
    `asyncio.Future` the batchers and `TokenStream` use. Not `concurrent.futures.Future`: that
    one raises when it is set after a cancel, and here the pipe's thread may cancel a job while
    the worker settles it; this one keeps whichever came first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "pending"  # "done", "cancelled"
        self._result: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[_Future], None]] = []

    def _finish(self, state: str, result: Any = None, error: BaseException | None = None) -> bool:
        with self._lock:
            if self._state != "pending":
                return False
            self._state, self._result, self._error = state, result, error
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _run_callback(callback, self)
        return True

    def set_result(self, result: Any) -> None:
        self._finish("done", result)

    def set_exception(self, error: BaseException) -> None:
        self._finish("done", error=error)

    def cancel(self) -> bool:
        return self._finish("cancelled")

    def done(self) -> bool:
        return self._state != "pending"

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self) -> BaseException | None:
        return self._error

    def add_done_callback(self, callback: Callable[[_Future], None]) -> None:
        with self._lock:
            if self._state == "pending":
                self._callbacks.append(callback)
                return
        _run_callback(callback, self)


def _run_callback(callback: Callable[[_Future], None], future: _Future) -> None:
    """As an event loop runs a done-callback: its error is logged, and the worker (or the
    reader) that settled the future goes on."""
    try:
        callback(future)
    except Exception:
        log.exception("a callback of a batcher job failed")


class _AtOnce:
    """The child's stand-in for an event loop: ``call_soon_threadsafe`` calls at once, in the
    calling thread. So the worker settles a job and relays a stream's tokens itself, with no
    hop through a loop's queue, its wake-up pipe and a second thread taking turns with the
    worker for the interpreter lock (under 16 clients that hop was ~8% of the child's time)."""

    @staticmethod
    def create_future() -> _Future:
        return _Future()

    @staticmethod
    def call_soon_threadsafe(fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)


def _child(conn: Connection) -> None:
    """The child's main: its batcher's worker thread decodes, and sends each job's tokens and
    answer down the pipe itself as it settles them (`_AtOnce`); this thread reads the pipe
    and turns its messages into ``submit()`` calls, cancels and closes."""
    try:
        seq2seq, options = _get(conn)
        kind = options.pop("kind")
        cls = ContinuousBatcher if kind == "continuous" else DynamicBatcher
        batcher = cls(seq2seq, **options, max_queue=10**9)  # the parent enforces max_queue
        batcher.loop = _AtOnce()
        batcher.counts_tokens = False  # the parent counts (`ProcessBatcher._read`)
        first = next(seq2seq.model.parameters()) if kind == "continuous" else None
        batcher.start()
    except Exception as error:  # reported to the parent, which raises it
        _put(conn, ("failed", f"{type(error).__name__}: {error}"))
        return
    sending = threading.Lock()  # the worker and this thread both send
    futures: dict[int, _Future] = {}
    streams: dict[int, TokenStream] = {}

    def send(message: tuple) -> None:
        try:
            with sending:
                _put(conn, message)
        except OSError:  # the parent has gone: nobody to answer
            pass

    def submit(kind: str, job: int, texts: list[str], job_options: dict,
               encoded: tuple | None) -> _Future:
        if encoded is not None:
            encoded = unpack_encoded(encoded, first.device, first.dtype)
        if kind == "job":
            return (batcher.submit(texts, job_options) if encoded is None
                    else batcher.submit_encoded(texts, job_options, encoded))
        # the sink is set before the worker sees the job: it relays from the worker's thread,
        # possibly before this one returns
        stream = batcher.relay(texts, job_options, lambda tokens: send(("tokens", job, tokens)),
                               encoded)
        streams[job] = stream
        return stream.future

    def done(job: int, result: Any, error: BaseException | None) -> None:
        send(("done", job, result, None if error is None else _picklable(error),
              dict(batcher.stats)))

    def answer(job: int, future: _Future) -> None:
        futures.pop(job, None)
        streams.pop(job, None)
        if not future.cancelled():  # (a cancelled job: the parent has answered its client)
            error = future.exception()
            done(job, None if error is not None else future.result(), error)

    send(("ready", dict(batcher.stats)))
    try:
        while True:
            try:
                message = _get(conn)
            except (EOFError, OSError):  # the parent has gone
                break
            except Exception:  # a message that does not unpickle: the others go on
                log.exception("a message from the server could not be read")
                continue
            if message[0] in ("job", "stream"):
                kind, job, texts, job_options, encoded = message
                try:
                    future = submit(kind, job, texts, job_options, encoded)
                except Exception as error:
                    done(job, None, error)
                    continue
                futures[job] = future
                future.add_done_callback(functools.partial(answer, job))
            elif message[0] == "cancel":  # (.get: the worker may have answered it just now)
                if (future := futures.get(message[1])) is not None:
                    future.cancel()
            elif message[0] == "close":
                if (stream := streams.get(message[1])) is not None:
                    stream.close(message[2])
            elif message[0] == "stop":
                break
        batcher.stop()  # the worker finishes the rows in flight and sends their answers
    finally:
        conn.close()
