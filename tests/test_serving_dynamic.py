"""Dynamic batching (`tformer.serving.batching`): concurrent requests share a batch and equal
one at a time, options never mixed; rounds keep arrival order and size."""

from __future__ import annotations

import asyncio

import httpx

from tformer.serving import ServeSettings, create_app

from . import serving_helpers as helpers
from .serving_helpers import NEW, StubSeq2Seq

#: The shared fixtures (`tests/serving_helpers.py`), found by name.
model_dir, seq2seq, texts = helpers.model_dir, helpers.seq2seq, helpers.texts


def test_concurrent_requests_share_a_batch_and_equal_one_at_a_time(seq2seq, texts):
    """14 concurrent requests, 10 greedy and 4 with beam search: one round, two generate()
    calls (options never mixed), and every output equal to generating its text alone."""
    app = create_app(seq2seq, settings=ServeSettings(max_wait_ms=1500, max_batch_size=16,
                                                     batching="dynamic"))
    greedy, beam = texts[:10], texts[10:14]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            calls = [c.post("/v1/generate", json={"inputs": [t], "max_new_tokens": NEW})
                     for t in greedy]
            calls += [c.post("/v1/generate", json={"inputs": [t], "max_new_tokens": NEW,
                                                   "num_beams": 2}) for t in beam]
            return await asyncio.gather(*calls)

    try:
        responses = asyncio.run(main())
    finally:
        app.state.batcher.stop()
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert [b["batch_inputs"] for b in bodies] == [10] * 10 + [4] * 4
    assert [b["outputs"][0] for b in bodies[:10]] == [
        seq2seq.generate(t, max_new_tokens=NEW) for t in greedy]
    assert [b["outputs"][0] for b in bodies[10:]] == [
        seq2seq.generate(t, max_new_tokens=NEW, num_beams=2) for t in beam]
    assert app.state.batcher.stats["generate_calls"] == 2


def test_batcher_rounds_keep_arrival_order_and_size():
    """max_batch_size 4: a job that does not fit waits, first in line, for the next round; one
    larger than a batch runs alone; a cancelled job takes no room."""
    from tformer.serving.batching import DynamicBatcher

    stub = StubSeq2Seq(block=("hold",))
    batcher = DynamicBatcher(stub, max_batch_size=4, max_wait_ms=300, max_queue=100)
    options = {"max_new_tokens": 4}

    async def main():
        held = batcher.submit(["hold"], options)
        while not stub.calls:  # the worker is busy: what follows queues up behind it
            await asyncio.sleep(0.01)
        a = batcher.submit(["a1", "a2", "a3"], options)
        gone = batcher.submit(["x"], options)
        gone.cancel()
        c = batcher.submit(["c1"], options)
        b = batcher.submit(["b1", "b2", "b3"], options)
        big = batcher.submit([f"d{i}" for i in range(6)], options)
        stub.release.set()
        await held
        return [(await f).outputs for f in (a, b, c, big)]

    try:
        outputs = asyncio.run(main())
    finally:
        batcher.stop()
    assert stub.calls == [["hold"], ["a1", "a2", "a3", "c1"], ["b1", "b2", "b3"],
                          [f"d{i}" for i in range(6)]]
    assert outputs == [["A1", "A2", "A3"], ["B1", "B2", "B3"], ["C1"], [f"D{i}" for i in range(6)]]
    assert batcher.stats["dropped"] == 1 and batcher.stats["largest_batch"] == 6
