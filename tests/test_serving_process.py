"""The batcher in a process of its own (`tformer.serving.process`): cancels reach the child, a
dead child fails its requests and the health check, any engine is served, start failures are
clear."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
import time

import httpx
import pytest

from tformer.serving import ServerThread, ServeSettings, create_app

from . import serving_helpers as helpers
from .serving_helpers import GREEDY, NEW, error_of

#: The shared fixtures (`tests/serving_helpers.py`), found by name.
model_dir, seq2seq, texts = helpers.model_dir, helpers.seq2seq, helpers.texts


def test_batcher_process_drops_a_cancelled_job_and_answers_the_others(seq2seq, texts):
    """A future cancelled in the server (client gone, timeout) after its job was sent is
    cancelled in the child: the job is dropped there, and the others get the outputs of
    `Seq2Seq.generate`. The child is paused (SIGSTOP) while the jobs (encoded in the server's
    process first) and then the cancel are sent, so the cancel reaches it before the job's
    row is done (dropped from the queue, or from the running batch). A job cancelled before it
    was encoded is never sent (the child's counters show only the three)."""
    from tformer.serving.process import ProcessBatcher

    batcher = ProcessBatcher(seq2seq, kind="continuous", max_batch_size=8, max_wait_ms=0,
                             max_queue=100)

    async def main():
        # A job cancelled while it waits to be encoded here never reaches the child.
        gate = threading.Event()
        batcher.call(gate.wait)  # holds the thread that encodes
        early = batcher.submit([texts[3]], {**GREEDY, "max_new_tokens": NEW})
        early.cancel()
        await asyncio.sleep(0)
        gate.set()
        batcher._process.send_signal(signal.SIGSTOP)
        try:
            futures = [batcher.submit([t], {**GREEDY, "max_new_tokens": NEW}) for t in texts[:3]]
            batcher._model_thread.submit(lambda: None).result()  # all three encoded and queued
            futures[1].cancel()
            await asyncio.sleep(0)  # the done-callback queues the cancel, after the job
        finally:
            batcher._process.send_signal(signal.SIGCONT)
        return [(await futures[0]).outputs[0], (await futures[2]).outputs[0]]

    batcher.start()
    try:
        outputs = asyncio.run(main())
    finally:
        batcher.stop()
    assert outputs == [seq2seq.generate(texts[0], max_new_tokens=NEW),
                       seq2seq.generate(texts[2], max_new_tokens=NEW)]
    assert batcher.stats["dropped"] == 1 and batcher.stats["texts"] == 2, batcher.stats
    assert batcher.stats["pre_encoded"] <= 3 and batcher._waiting == 0, batcher.stats
    assert not batcher.healthy  # stopped


def test_batcher_process_encodes_the_jobs_that_wait_together(seq2seq, texts):
    """Jobs that arrive while the server's process is busy encoding are encoded together, in
    one pass of at most a batch of texts (max_batch_size 4: a pass of four 1-text jobs, then
    the 2-text job), and decode to `Seq2Seq.generate`'s outputs. A pass that fails is retried
    one job at a time, so only the job at fault fails."""
    from tformer.serving.process import ProcessBatcher

    batcher = ProcessBatcher(seq2seq, kind="continuous", max_batch_size=4, max_wait_ms=0,
                             max_queue=100)
    passes = []
    encode_together = batcher._encoder.encode_together

    def spy(jobs):
        passes.append([len(t) for t, _ in jobs])
        if any(text.startswith("BAD") for t, _ in jobs for text in t):
            raise ValueError("this text cannot be encoded")
        return encode_together(jobs)

    batcher._encoder.encode_together = spy
    options = {**GREEDY, "max_new_tokens": NEW}

    async def main():
        gate = threading.Event()
        batcher.call(gate.wait)  # holds the thread that encodes while the jobs come
        try:
            futures = [batcher.submit([t], options) for t in [*texts[:2], "BAD", texts[2]]]
            futures.append(batcher.submit(texts[3:5], options))
        finally:
            gate.set()
        return await asyncio.gather(*futures, return_exceptions=True)

    batcher.start()
    try:
        results = asyncio.run(main())
    finally:
        batcher.stop()
    assert passes == [[1, 1, 1, 1], [1], [1], [1], [1], [2]]
    assert isinstance(results[2], ValueError)
    assert [results[i].outputs[0] for i in (0, 1, 3)] == [
        seq2seq.generate(t, max_new_tokens=NEW) for t in texts[:3]]
    assert results[4].outputs == seq2seq.generate(texts[3:5], max_new_tokens=NEW)


def test_batcher_process_that_dies_fails_its_requests_and_the_health_check(seq2seq, texts):
    """The child killed while a request waits on it: that request, and every later one, is
    answered 503 worker_down at once (not after the timeout), and /healthz says 503."""
    app = create_app(seq2seq, settings=ServeSettings(batcher_process=True, timeout_s=120))
    body = {"inputs": texts[:2], "max_new_tokens": NEW}
    with ServerThread(app) as server:
        batcher = app.state.batcher
        first = httpx.post(server.url + "/v1/generate", json=body, timeout=60)
        assert first.json()["outputs"] == seq2seq.generate(texts[:2], max_new_tokens=NEW)
        assert httpx.get(server.url + "/healthz").status_code == 200
        batcher._process.send_signal(signal.SIGSTOP)  # holds the next request in flight
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, server.url + "/v1/generate", json=body, timeout=60)
            deadline = time.monotonic() + 30
            while not batcher._pending and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher._pending, "the request never reached the batcher"
            started = time.monotonic()
            batcher._process.kill()
            answer = waiting.result()
        assert time.monotonic() - started < 10
        assert error_of(answer, 503)["code"] == "worker_down"
        assert error_of(httpx.post(server.url + "/v1/generate", json=body, timeout=60),
                        503)["code"] == "worker_down"
        assert error_of(httpx.get(server.url + "/healthz"), 503)["code"] == "worker_down"


def test_batcher_process_serves_any_engine_and_survives_an_error_that_does_not_unpickle():
    """Dynamic batching in a process of its own drives an engine without a PyTorch model; an
    exception the parent could not unpickle reaches its request as a RuntimeError with its
    text, and the batcher goes on answering."""
    from tformer.serving.process import ProcessBatcher

    from .serving_helpers import UpperSeq2Seq

    batcher = ProcessBatcher(UpperSeq2Seq(), kind="dynamic", max_batch_size=4, max_wait_ms=0,
                             max_queue=10)

    async def main():
        first = await batcher.submit(["a b"], {"max_new_tokens": 4})
        with pytest.raises(RuntimeError, match=r"TwoArgumentError: cannot generate \(code 7\)"):
            await batcher.submit(["fail"], {"max_new_tokens": 4})
        after = await batcher.submit(["c"], {"max_new_tokens": 4})
        return first.outputs, after.outputs

    batcher.start()
    try:
        assert asyncio.run(main()) == (["A B"], ["C"])
        assert batcher.healthy and batcher._waiting == 0
    finally:
        batcher.stop()


def test_batcher_process_start_failure_is_a_clear_error(seq2seq):
    """A model that cannot be handed to the child (here: it does not pickle) fails at start,
    saying what failed, and leaves no process behind and nothing half-started."""
    from tformer.serving.process import ProcessBatcher

    class Unpicklable:
        def __init__(self, inner):
            self.model, self.tokenizer = inner.model, inner.tokenizer

        def __reduce__(self):
            raise TypeError("this model cannot be pickled")

    batcher = ProcessBatcher(Unpicklable(seq2seq), kind="dynamic", max_batch_size=4,
                             max_wait_ms=0, max_queue=10)
    with pytest.raises(RuntimeError, match="failed to start: this model cannot be pickled"):
        batcher.start()
    assert batcher._process is None  # the child was killed and reaped, nothing half-started
    with pytest.raises(RuntimeError, match="failed to start"):  # and a retry fails the same way
        batcher.start()
