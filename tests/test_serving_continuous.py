"""Continuous batching (`tformer.serving.continuous`) and its slot cache
(`tformer.serving.slot_cache`): outputs equal `generate()` as rows join and leave, every step's
logits equal an uncached forward pass, and a failure or a departure stays with its request."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from . import serving_helpers as helpers
from .serving_helpers import GREEDY, NEW, until

#: The shared fixtures (`tests/serving_helpers.py`), found by name.
copy_seq2seq, model_dir, own, seq2seq, texts = (
    helpers.copy_seq2seq, helpers.model_dir, helpers.own, helpers.seq2seq, helpers.texts)


def test_continuous_batching_equals_generate_as_requests_join_and_leave(own, texts):
    """Requests arriving while others decode join the running batch (4 rows at most), each with
    its own max_new_tokens, and leave as soon as they are done: every output equals generating
    its text alone; a 3-text request waits for room and is answered whole; a beam-search
    request in between goes through generate()."""
    from tformer.serving.continuous import ContinuousBatcher

    batcher = ContinuousBatcher(own, max_batch_size=4, max_wait_ms=0, max_queue=100)
    lengths = [NEW, 2, 5, NEW, 1, 3, NEW, 4, 6, 2, NEW, 5]

    async def main():
        futures = []
        for i, (text, n) in enumerate(zip(texts, lengths)):
            futures.append(batcher.submit([text], {**GREEDY, "max_new_tokens": n}))
            await asyncio.sleep(0.003 * (i % 3))
            if i == 6:
                beam = batcher.submit([texts[0]], {**GREEDY, "max_new_tokens": NEW,
                                                   "num_beams": 2})
        futures.append(batcher.submit(texts[12:15], {**GREEDY, "max_new_tokens": NEW}))
        return [await f for f in futures], await beam

    try:
        results, beam = asyncio.run(main())
    finally:
        batcher.stop()
    singles = [r.outputs[0] for r in results[:-1]]
    assert singles == [own.generate(t, max_new_tokens=n) for t, n in zip(texts, lengths)]
    assert results[-1].outputs == [own.generate(t, max_new_tokens=NEW) for t in texts[12:15]]
    assert len(set(singles)) > 3  # different outputs: a row mix-up would show
    assert beam.outputs == [own.generate(texts[0], max_new_tokens=NEW, num_beams=2)]
    stats = batcher.stats
    assert 2 <= stats["largest_batch"] <= 4 and stats["generate_calls"] == 1, stats
    assert stats["texts"] == 16 and stats["steps"] < stats["row_steps"], stats  # 12 + 3 + beam
    assert stats["joined"] > 0, stats  # rows joined a batch that was already decoding
    assert 2 <= max(r.batch_inputs for r in results) <= 4  # never more rows than the limit


@torch.inference_mode()
def test_slot_cache_rows_joining_and_leaving_decode_as_if_alone(own, texts):
    """The continuous batcher's steps driven by hand (no worker involved), on a schedule where
    rows join a batch that is decoding; a row leaves slot 0 and a later row is moved into it;
    two rows leave at the same step and both freed slots are refilled; a longer source than
    any before makes the source buffers grow; and a 40-step row makes the history buffers grow
    past their first 32 columns. At every step, every row's logits equal those of a plain
    forward pass over its text and the tokens produced so far, with no cache."""
    from tformer.serving.continuous import ContinuousBatcher
    from tformer.serving.slot_cache import SlotCache

    batcher = ContinuousBatcher(own, max_batch_size=4, max_wait_ms=0, max_queue=100)
    batcher.eos_ids = set()  # every row decodes exactly its max_new_tokens
    by_length = sorted(texts[:12], key=len)
    a, b, c, d, e, f = by_length[0], by_length[1], by_length[-1], *by_length[2:5]
    schedule = [  # (steps to run first, texts to admit with their max_new_tokens)
        (0, [(a, 3), (b, 8)]),  # slots a0 b1
        (2, [(c, 6)]),  # the longest source: source buffers grow; a leaves, c moves to slot 0
        (2, [(d, 40), (e, 6)]),  # slots c0 b1 d2 e3; c and b leave together, d and e move
        (7, [(f, 5)]),
    ]
    model, cache = own.model.model, batcher._cache
    output, logits, keeps = model.output, [], []

    def recorded(*args):  # the step's logits (with copy attention's mixture, if any)
        out = output(*args)
        logits.append(out[:, -1])
        return out

    model.output = recorded
    keep = cache.keep
    cache.keep = lambda kept: keeps.append(list(kept)) or keep(kept)
    widths = []

    def check(rows) -> None:
        assert cache.history == cache.lengths[: cache.n].tolist()
        assert cache.n == len(rows) == len(cache.source.sources)

    try:
        tokens_of, seen, rows = helpers.drive(
            batcher, schedule, logits, on_step=check,
            on_admit=lambda rows: widths.append(cache.source.memory.size(1)))
    finally:
        del model.output  # the fixture's model is shared
        batcher.stop()
    assert rows is None and batcher.stats["joined"] == 4, batcher.stats  # c, d, e, f
    assert keeps[:3] == [[1, 2], [2, 3], [0]], keeps  # slot 0 refilled; two leave at once
    assert widths[1] > widths[0]  # the source buffers grew
    assert cache.self_kv[0][0].size(2) > SlotCache.HEADROOM  # the history grew
    for text, n in [pair for _, group in schedule for pair in group]:
        tokens = tokens_of[text]
        assert len(tokens) == n == len(seen[text])
        src = torch.tensor(own.tokenizer([text])["input_ids"])
        prefix = torch.tensor([[batcher.family.start_id] + tokens[:-1]])
        torch.testing.assert_close(torch.stack(seen[text]), model(src, prefix).logits[0],
                                   atol=1e-4, rtol=1e-4)


def test_continuous_batching_admits_texts_encoded_elsewhere_with_the_others(own, texts):
    """Jobs encoded beforehand (`ContinuousBatcher.encode`, as a server whose batcher runs in
    another process does) and jobs the worker encodes, admitted together with sources of
    different lengths (padded to one width), decode to the outputs of `Seq2Seq.generate`. One
    of them goes through the numpy arrays the batcher process receives (``pack_encoded``)."""
    from tformer.serving.batching import Job
    from tformer.serving.continuous import ContinuousBatcher, Decoding
    from tformer.serving.process import pack_encoded, unpack_encoded

    batcher = ContinuousBatcher(own, max_batch_size=8, max_wait_ms=0, max_queue=100)
    options = {**GREEDY, "max_new_tokens": NEW}
    chosen = sorted(texts[:6], key=len)  # the encoded ones are the shortest and the longest
    jobs_texts = [chosen[0:1], chosen[1:3], chosen[5:6], chosen[3:5]]
    loop = asyncio.new_event_loop()
    try:
        encoded = {0: batcher.encode(jobs_texts[0], options),
                   2: unpack_encoded(pack_encoded(batcher.encode(jobs_texts[2], options)),
                                     torch.device("cpu"), torch.float32)}
        jobs = [Job(t, options, loop.create_future(), loop, encoded=encoded.get(i))
                for i, t in enumerate(jobs_texts)]
        widths = {job.encoded[2].size(1) for job in jobs if job.encoded is not None}
        assert len(widths) == 2  # two source widths to pad to one
        rows = batcher._admit(None, [Decoding(j, time.monotonic(), [None] * len(j.texts),
                                              len(j.texts)) for j in jobs])
        while rows is not None:
            rows = batcher._step(rows)
        results = loop.run_until_complete(asyncio.gather(*(j.future for j in jobs)))
    finally:
        loop.close()
    for t, result in zip(jobs_texts, results):
        assert result.outputs == own.generate(t, max_new_tokens=NEW)


def test_jobs_encoded_together_equal_each_encoded_alone(own, texts):
    """`ContinuousBatcher.encode_together` (one encoder pass for several jobs, as the server's
    process encodes the requests that arrive together) gives each job what encoding it alone
    gives: as wide as its own longest source, with equal keys, values and encoder output;
    a job's own max_source_length still truncates it."""
    from tformer.serving.continuous import ContinuousBatcher

    batcher = ContinuousBatcher(own, max_batch_size=8, max_wait_ms=0, max_queue=100)
    chosen = sorted(texts[:6], key=len)
    jobs = [(chosen[5:6], GREEDY), (chosen[0:2], GREEDY), (chosen[3:4], {"max_source_length": 3}),
            (chosen[2:5], GREEDY)]
    together = batcher.encode_together(jobs)
    alone = [batcher.encode(t, options) for t, options in jobs]
    assert [x[2].shape for x in together] == [x[2].shape for x in alone]
    assert len({x[2].size(1) for x in together}) == 4  # each job as wide as its own source
    assert together[2][2].size(1) == 3  # truncated by its own max_source_length
    for mine, reference in zip(together, alone):
        torch.testing.assert_close(mine[0], reference[0], atol=1e-5, rtol=1e-5)  # keys, values
        torch.testing.assert_close(mine[1] * mine[2][..., None], reference[1] * reference[2][..., None],
                                   atol=1e-5, rtol=1e-5)  # encoder output at real positions
        assert torch.equal(mine[2], reference[2]) and torch.equal(mine[3], reference[3])


def test_continuous_batching_drops_a_request_cancelled_while_it_decodes(seq2seq, texts):
    """A client leaving while its row decodes: the row leaves the batch at the next step and
    the other rows' outputs are those of a run without the cancellation. (End-of-sequence is
    switched off so that every row decodes for 40 steps: the cancel lands mid-decoding.)"""
    from tformer.serving.continuous import ContinuousBatcher

    options = {**GREEDY, "max_new_tokens": 40}

    async def run(cancel: bool):
        batcher = ContinuousBatcher(seq2seq, max_batch_size=8, max_wait_ms=0, max_queue=100)
        batcher.eos_ids = set()
        try:
            futures = [batcher.submit([t], options) for t in texts[:3]]
            if cancel:
                while batcher.stats["steps"] < 3:
                    await asyncio.sleep(0.001)
                futures[1].cancel()
            results = [await f for i, f in enumerate(futures) if not (cancel and i == 1)]
            return [r.outputs[0] for r in results], dict(batcher.stats)
        finally:
            batcher.stop()

    (whole, _), (kept, stats) = asyncio.run(run(False)), asyncio.run(run(True))
    assert kept == [whole[0], whole[2]]
    assert stats["dropped"] == 1 and stats["texts"] == 2, stats
    # (the three may be admitted over up to three steps, hence 40-42 steps in all)
    assert 40 <= stats["steps"] <= 42 and stats["row_steps"] < 3 * 40, stats  # it left mid-way


def test_continuous_batching_a_failed_admission_fails_only_its_request(seq2seq, texts):
    """A newcomer whose encoding fails while another row decodes gets the error; the row
    already decoding and a later newcomer are answered as in a run without the failure.
    (End-of-sequence is off: every row decodes for 30 steps.)"""
    from tformer.serving.continuous import ContinuousBatcher

    options = {**GREEDY, "max_new_tokens": 30}

    async def run(fail: bool):
        batcher = ContinuousBatcher(seq2seq, max_batch_size=8, max_wait_ms=0, max_queue=100)
        batcher.eos_ids = set()
        encode, calls = batcher.family.encode, []

        def broken(*args):
            calls.append(batcher.stats["steps"])
            if fail and len(calls) == 2:
                raise RuntimeError("the encoder broke")
            return encode(*args)

        batcher.family.encode = broken
        try:
            first = batcher.submit([texts[0]], options)
            await until(lambda: batcher.stats["steps"] >= 2)
            second = batcher.submit([texts[1]], options)
            if fail:
                with pytest.raises(RuntimeError, match="encoder broke"):
                    await asyncio.wait_for(second, 60)
            await until(lambda: batcher.stats["steps"] >= 5)
            third = batcher.submit([texts[2]], options)
            outputs = [(await asyncio.wait_for(f, 60)).outputs[0] for f in (first, third)]
            return outputs, dict(batcher.stats), calls
        finally:
            batcher.stop()

    (whole, _, _), (kept, stats, calls) = asyncio.run(run(False)), asyncio.run(run(True))
    assert kept == whole
    assert calls[1] >= 2, calls  # it failed while the first row was decoding
    assert stats["failed"] == 1 and stats["texts"] == 2, stats


@torch.inference_mode()
def test_continuous_batching_a_text_that_cannot_be_admitted_fails_alone(seq2seq, texts):
    """Newcomers are admitted together; when that fails, each is tried alone, so only the one
    at fault gets the error: the others, and the row already decoding, are answered as
    generate() answers them, and the cache stays in step with the rows."""
    from tformer.serving.batching import Job
    from tformer.serving.continuous import ContinuousBatcher, Decoding

    batcher = ContinuousBatcher(seq2seq, max_batch_size=8, max_wait_ms=0, max_queue=100)
    tokenize, groups = batcher.family.tokenize, []

    def broken(jobs):
        groups.append(len(jobs))
        if any(job.texts[0] == "BAD" for job in jobs):
            raise ValueError("cannot take BAD")
        return tokenize(jobs)

    batcher.family.tokenize = broken
    loop = asyncio.new_event_loop()  # run only to deliver the answers
    request = lambda text: Decoding(Job([text], {**GREEDY, "max_new_tokens": NEW},  # noqa: E731
                                         loop.create_future(), loop), time.monotonic(), [None], 1)
    try:
        first, bad, good = request(texts[0]), request("BAD"), request(texts[1])
        rows = batcher._step(batcher._admit_all(None, [first]))
        rows = batcher._admit_all(rows, [bad, good])
        assert [r.job.texts[0] for r in rows.requests] == [texts[0], texts[1]]
        assert batcher._cache.n == len(rows) and groups == [1, 2, 1, 1], groups
        while rows is not None:
            rows = batcher._step(rows)
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        batcher.stop()
        loop.close()
    with pytest.raises(ValueError, match="BAD"):
        bad.job.future.result()
    for r, text in ((first, texts[0]), (good, texts[1])):
        assert r.job.future.result().outputs == [seq2seq.generate(text, max_new_tokens=NEW)]
    assert batcher.stats["failed"] == 1, batcher.stats


def test_continuous_batching_a_failed_step_fails_its_rows_and_serving_goes_on(seq2seq, texts):
    """A decoder step that raises fails the requests of the rows in it, resets the cache, and
    the next request is answered as in a run where nothing failed. (End-of-sequence is off.)"""
    from tformer.serving.continuous import ContinuousBatcher

    async def run(fail: bool):
        batcher = ContinuousBatcher(seq2seq, max_batch_size=8, max_wait_ms=0, max_queue=100)
        batcher.eos_ids = set()
        step, calls = batcher._step, []

        def broken(rows):
            calls.append(len(rows))
            if fail and len(calls) == 3:
                raise RuntimeError("the step broke")
            return step(rows)

        batcher._step = broken
        try:
            first = batcher.submit([texts[0]], {**GREEDY, "max_new_tokens": 30})
            if fail:
                with pytest.raises(RuntimeError, match="step broke"):
                    await asyncio.wait_for(first, 60)
            else:
                await asyncio.wait_for(first, 60)
            second = batcher.submit([texts[1]], {**GREEDY, "max_new_tokens": 8})
            outputs = (await asyncio.wait_for(second, 60)).outputs
        finally:
            batcher.stop()  # (joins the worker: its last retirement is done)
        return outputs, dict(batcher.stats), batcher._cache.n

    (whole, _, _), (after, stats, slots) = asyncio.run(run(False)), asyncio.run(run(True))
    assert after == whole
    assert stats["failed"] == 1 and stats["texts"] == 1 and slots == 0, (stats, slots)


def test_continuous_batching_stop_finishes_the_rows_in_flight(seq2seq, texts):
    from tformer.serving.batcher import BatcherStopped
    from tformer.serving.continuous import ContinuousBatcher

    batcher = ContinuousBatcher(seq2seq, max_batch_size=8, max_wait_ms=0, max_queue=100)

    async def main():
        futures = [batcher.submit([t], {**GREEDY, "max_new_tokens": NEW}) for t in texts[:3]]
        while batcher.stats["steps"] < 1:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(batcher.stop)
        with pytest.raises(BatcherStopped):
            batcher.submit([texts[3]], {**GREEDY, "max_new_tokens": NEW})
        return [await f for f in futures]

    results = asyncio.run(main())
    assert [r.outputs[0] for r in results] == [seq2seq.generate(t, max_new_tokens=NEW)
                                               for t in texts[:3]]
    assert not batcher.healthy


@pytest.mark.parametrize("scale", [10.0, 0.3], ids=["peaked", "flat"])
def test_sampling_filters_equal_hugging_faces_warpers(scale):
    """`filter_logits` (per row: temperature, top-k, top-p, in one batched pass) against
    transformers' own logits warpers applied row by row, in generate()'s order: with peaked
    logits (every row's kept tokens among the first candidates) and flat ones (nuclei wider
    than the candidates, and a top-k larger: those rows sort their whole vocabulary)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from tformer.serving.sampling import filter_logits

    torch.manual_seed(0)
    settings = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6), (2.0, 1, 0.3),
                (1.0, 100, 1.0), (0.9, 200, 0.95)]
    logits = torch.randn(len(settings), 500) * scale
    ours = filter_logits(logits, *(torch.tensor(column) for column in zip(*settings)))
    for row, (temperature, top_k, top_p) in enumerate(settings):
        theirs = TemperatureLogitsWarper(temperature)(None, logits[row: row + 1].clone())
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1.0:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(theirs[0])), row
        kept = ~torch.isinf(theirs[0])
        torch.testing.assert_close(ours[row][kept], theirs[0][kept])


def test_text_stream_shows_only_what_cannot_change():
    """Pieces of text add up to the final output: trailing white space, a run of byte-fallback
    tokens and a tail that may start a stop sequence wait; a stop sequence ends the text."""
    from tformer.serving.text_stream import TextStream

    pieces = {1: "A", 2: " dog", 3: " ", 4: "\u00e2", 5: "\u0080", 6: "runs", 7: "END", 8: "!"}
    held = {4, 5}  # as byte tokens: their text shows only once a non-byte token follows

    def decode(tokens):
        return "".join(pieces[t] for t in tokens)

    stream = TextStream(decode, stops=["ENDX"], held=held)
    shown = [stream.add(t) for t in (1, 2, 3, 4, 5, 6, 7)]
    assert shown == ["A", " dog", "", "", "", " \u00e2\u0080runs", ""], shown  # "END" may stop
    assert stream.finish(decode([1, 2, 3, 4, 5, 6, 7]).strip()) == "END"
    assert stream.sent == "A dog \u00e2\u0080runsEND" and not stream.stopped
    stopping = TextStream(decode, stops=["runs"])
    assert "".join(stopping.add(t) for t in (1, 2, 3, 6, 8)) == "A dog "  # (cut, not stripped)
    assert stopping.stopped and stopping.finish("A dog runs!") == ""
    assert stopping.sent == "A dog " and TextStream(decode, ["runs"]).finish("A dog runs!") == (
        "A dog ")
