"""tformer serve: the HTTP API against `Seq2Seq.generate` and the attention maps, every limit,
the API key, dynamic batching (batched equals one at a time, options never mixed), a bounded
load test and disconnecting clients on a real uvicorn server, and schemathesis on the schema."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

import tformer
from tformer.serving import ServerThread, ServeSettings, create_app, require_safetensors
from tformer.serving.app import STATIC_DIR
from tformer.serving.settings import resolve_api_key

from .serving_helpers import StubSeq2Seq, served_checkpoint, source_texts

NEW = 8  # max_new_tokens in these tests: the model is tiny, outputs are short


@pytest.fixture(scope="module")
def model_dir(reference_run, tmp_path_factory) -> Path:
    return served_checkpoint(reference_run, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def seq2seq(model_dir) -> tformer.Seq2Seq:
    return tformer.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def copy_seq2seq(reference_run, tmp_path_factory) -> tformer.Seq2Seq:
    """As ``seq2seq``, with copy attention (`tformer.model.copy`)."""
    out = tmp_path_factory.mktemp("served-copy")
    return tformer.load(served_checkpoint(reference_run, out, copy_attention=True), device="cpu")


@pytest.fixture(params=["plain", "copy"])
def own(request) -> tformer.Seq2Seq:
    """The own Transformer without and with copy attention, for the continuous batcher."""
    return request.getfixturevalue("seq2seq" if request.param == "plain" else "copy_seq2seq")


@pytest.fixture(scope="module")
def texts(data_files) -> list[str]:
    return source_texts(data_files)


def client(seq2seq, **overrides) -> TestClient:
    return TestClient(create_app(seq2seq, settings=ServeSettings(**overrides)))


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


# -- the happy path ------------------------------------------------------------------------


def test_generate_equals_seq2seq_generate_with_counts(seq2seq, texts):
    with client(seq2seq) as c:
        greedy = c.post("/v1/generate", json={"inputs": texts[:3], "max_new_tokens": NEW})
        beam = c.post("/v1/generate", json={"inputs": texts[3:5], "max_new_tokens": NEW,
                                            "num_beams": 3, "length_penalty": 0.5})
    assert greedy.status_code == 200, greedy.text
    body = greedy.json()
    assert body["outputs"] == seq2seq.generate(texts[:3], max_new_tokens=NEW)
    assert len(set(body["outputs"])) > 1  # the model's outputs differ: a mix-up would show
    tokenizer = seq2seq.tokenizer
    assert body["input_tokens"] == [len(tokenizer(t)["input_ids"]) for t in texts[:3]]
    assert body["output_tokens"] == [len(tokenizer(o, add_special_tokens=False)["input_ids"])
                                     for o in body["outputs"]]
    timing = body["timing"]
    assert 0 <= timing["queue_ms"] <= timing["total_ms"] and timing["generate_ms"] > 0
    assert body["batch_inputs"] == 3
    assert beam.json()["outputs"] == seq2seq.generate(texts[3:5], max_new_tokens=NEW, num_beams=3,
                                                      length_penalty=0.5)


def test_model_info_and_healthz(seq2seq, model_dir):
    settings = ServeSettings(max_beams=3, max_input_chars=100)
    with TestClient(create_app(seq2seq, settings=settings)) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        info = c.get("/v1/model").json()
    assert info["path"] == str(model_dir)
    assert info["model_type"] == "tformer"
    assert (info["engine"], info["model_class"]) == ("torch", "TformerForConditionalGeneration")
    assert info["parameters"] == sum(p.numel() for p in seq2seq.model.parameters())
    assert (info["device"], info["dtype"], info["attention"], info["auth"]) == (
        "cpu", "float32", True, False)
    assert info["limits"]["max_beams"] == 3 and info["limits"]["max_input_chars"] == 100
    assert info["limits"] == {**settings.limits(), "batching": "continuous"}  # auto, resolved
    assert "api_key" not in info["limits"]


def test_attention_equals_the_visualization_maps(seq2seq, texts):
    from tformer.visualization.attention import attention_maps

    with client(seq2seq) as c:
        given = c.post("/v1/attention", json={"input": texts[0], "target": "Ein Hund.",
                                              "include": ["cross"]})
        generated = c.post("/v1/attention", json={"input": texts[1], "max_new_tokens": NEW})
    assert given.status_code == 200, given.text
    expected = attention_maps(seq2seq, texts[0], "Ein Hund.").to_json()
    body = given.json()
    assert body["cross"] == expected["cross"]
    assert body["source_tokens"] == expected["source_tokens"]
    assert body["target_tokens"] == expected["target_tokens"]
    assert "encoder" not in body and "decoder" not in body
    maps = generated.json()
    reference = attention_maps(seq2seq, texts[1], max_new_tokens=NEW).to_json()
    for kind in ("encoder", "decoder", "cross"):
        assert maps[kind] == reference[kind]
    config = seq2seq.model.config
    assert (maps["layers"], maps["heads"]) == (config.n_decoder_layers, config.n_heads)
    assert len(maps["cross"]) == config.n_decoder_layers and len(maps["cross"][0]) == config.n_heads


def test_attention_of_a_copy_model_adds_its_copy_attention_and_p_gen(copy_seq2seq, seq2seq,
                                                                      texts):
    """With copy attention, /v1/attention also returns the copy attention (T, S; rows are
    distributions) and p_gen (T), equal to the model's own weights (`CopyGenerator.weights`,
    teacher-forced on the same pair); "copy" can be left out; a model without it has neither."""
    from tformer.visualization.attention import collate_pairs

    with client(copy_seq2seq) as c:
        body = c.post("/v1/attention", json={"input": texts[0], "target": "Ein Hund."}).json()
        without = c.post("/v1/attention", json={"input": texts[0], "target": "Ein Hund.",
                                                "include": ["cross"]}).json()
    with client(seq2seq) as c:
        plain = c.post("/v1/attention", json={"input": texts[0], "target": "Ein Hund."}).json()
    t, s = len(body["target_tokens"]), len(body["source_tokens"])
    copy, p_gen = torch.tensor(body["copy_attention"]), torch.tensor(body["p_gen"])
    assert copy.shape == (t, s) and p_gen.shape == (t,)
    torch.testing.assert_close(copy.sum(-1), torch.ones(t), atol=1e-3, rtol=0)
    inner = copy_seq2seq.model.model
    batch = collate_pairs(copy_seq2seq.model, copy_seq2seq.tokenizer, [texts[0]], ["Ein Hund."])
    with torch.no_grad():
        mask = batch["attention_mask"].bool()
        memory = inner.encode(batch["input_ids"], mask).hidden
        hidden = inner.decode(batch["decoder_input_ids"], memory, mask).hidden
        attention, gate = inner.copy.weights(hidden, memory, mask)
    torch.testing.assert_close(copy, attention[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(p_gen, torch.sigmoid(gate[0, :, 0]), atol=1e-4, rtol=0)
    assert "copy_attention" not in without and "p_gen" not in without and "cross" in without
    assert "copy_attention" not in plain and "p_gen" not in plain


def test_page_and_its_files_are_local(seq2seq):
    with client(seq2seq) as c:
        page = c.get("/")
        script = c.get("/static/app.js")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="generate"' in page.text and 'id="heatmap"' in page.text
    assert script.status_code == 200 and "v1/attention" in script.text
    for path in Path(str(STATIC_DIR)).iterdir():  # no CDN, nothing fetched from elsewhere
        text = path.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name


# -- limits, validation and errors ---------------------------------------------------------

LIMITS = dict(max_inputs=3, max_input_chars=80, max_input_tokens=20, max_new_tokens_cap=10,
              max_beams=2, max_queue=8)


@pytest.mark.parametrize("body, status, limit, value", [
    ({"inputs": ["a", "b", "c", "d"]}, 413, "max_inputs", 3),
    ({"inputs": ["ok", "x" * 81]}, 413, "max_input_chars", 80),
    ({"inputs": ["a b c d e f g h i j k l m n o p q r s t u v"]}, 413, "max_input_tokens", 20),
    ({"inputs": ["a"], "max_new_tokens": 11}, 422, "max_new_tokens_cap", 10),
    ({"inputs": ["a"], "num_beams": 3}, 422, "max_beams", 2),
])
def test_limits_are_answered_with_the_limit_named(seq2seq, body, status, limit, value):
    with client(seq2seq, **LIMITS) as c:
        error = error_of(c.post("/v1/generate", json=body), status)
    assert (error["limit"], error["value"]) == (limit, value)
    assert limit in error["message"]


def test_limits_on_attention_and_the_edges(seq2seq):
    long = "a b c d e f g h i j k l m n o p q r s t u v"
    with client(seq2seq, **LIMITS) as c:
        at_caps = c.post("/v1/generate", json={"inputs": ["a", "b", "c"], "max_new_tokens": 10,
                                               "num_beams": 2})
        truncated = c.post("/v1/generate", json={"inputs": [long], "max_source_length": 20,
                                                 "max_new_tokens": 2})
        target = c.post("/v1/attention", json={"input": "a", "target": long})
        beams = c.post("/v1/attention", json={"input": "a", "num_beams": 3})
    assert at_caps.status_code == 200, at_caps.text
    assert truncated.status_code == 200 and truncated.json()["input_tokens"] == [20]
    assert error_of(target, 413)["limit"] == "max_input_tokens"
    assert error_of(beams, 422)["limit"] == "max_beams"


def test_body_size_limit(seq2seq):
    settings = ServeSettings(max_inputs=1, max_input_chars=10)
    with TestClient(create_app(seq2seq, settings=settings)) as c:
        error = error_of(c.post("/v1/generate", content=b'{"inputs": ["' + b"x" * 200_000 + b'"]}',
                                headers={"content-type": "application/json"}), 413)
    assert (error["limit"], error["value"]) == ("max_body_bytes", settings.max_body_bytes)


@pytest.mark.parametrize("content, status, where", [
    (b'{"inputs": ["a"', 400, None),
    (b"[1, 2]", 422, None),
    (b'{"inputs": []}', 422, "inputs"),
    (b'{"texts": ["a"]}', 422, "inputs"),
    (b'{"inputs": ["a"], "num_beams": "4"}', 422, "num_beams"),
    (b'{"inputs": ["a"], "beams": 4}', 422, "beams"),
    (b'{"inputs": ["a"], "top_p": 0}', 422, "top_p"),
    (b'{"inputs": ["a"], "max_new_tokens": 0}', 422, "max_new_tokens"),
    (b'{"inputs": ["\\ud800"]}', 422, "inputs"),
])
def test_malformed_requests_get_json_errors(seq2seq, content, status, where):
    with client(seq2seq) as c:
        error = error_of(c.post("/v1/generate", content=content,
                                headers={"content-type": "application/json"}), status)
    assert error["code"] == ("invalid_json" if status == 400 else "invalid_request")
    if where:
        assert where in error["message"]


def test_wrong_route_method_or_media_type_are_json_errors(seq2seq):
    with client(seq2seq) as c:
        form = c.post("/v1/generate", content=b'{"inputs": ["a"]}',
                      headers={"content-type": "application/x-www-form-urlencoded"})
        assert error_of(form, 415)["code"] == "unsupported_media_type"
        assert error_of(c.get("/v2/nothing"), 404)["code"] == "not_found"
        assert error_of(c.get("/v1/generate"), 405)["code"] == "method_not_allowed"


# -- the API key ---------------------------------------------------------------------------


def test_api_key_guards_every_route_but_healthz_and_the_page(seq2seq):
    key = "s3cret-key"
    request = {"inputs": ["A dog."], "max_new_tokens": 2}
    with client(seq2seq, api_key=key) as c:
        for path in ("/healthz", "/", "/static/app.js", "/static/style.css"):
            assert c.get(path).status_code == 200, path
        for method, path in [("GET", "/v1/model"), ("POST", "/v1/generate"),
                             ("POST", "/v1/attention"), ("GET", "/openapi.json"), ("GET", "/docs")]:
            body = request if path == "/v1/generate" else {"input": "a"}
            kwargs = {"json": body} if method == "POST" else {}
            for headers in ({}, {"Authorization": f"Bearer {key}x"}, {"X-API-Key": key[:-1]},
                            {"Authorization": key}):
                response = c.request(method, path, headers=headers, **kwargs)
                assert error_of(response, 401)["code"] == "unauthorized", (path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
            for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
                assert c.request(method, path, headers=headers, **kwargs).status_code == 200
        schema = c.get("/openapi.json", headers={"X-API-Key": key}).json()
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])


def test_no_key_means_open_and_the_environment_supplies_one(seq2seq, monkeypatch):
    with client(seq2seq) as c:
        assert c.get("/v1/model").json()["auth"] is False
    monkeypatch.setenv("TFORMER_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("flag") == "flag"
    monkeypatch.setenv("TFORMER_API_KEY", "")
    assert resolve_api_key(None) is None


def test_settings_are_validated_and_bind_loopback():
    assert ServeSettings().host == "127.0.0.1" and ServeSettings().loopback
    assert not ServeSettings(host="0.0.0.0").loopback
    for field, value in [("max_beams", 0), ("max_batch_size", -1), ("timeout_s", 0),
                         ("api_key", " "), ("max_queue", 1)]:
        with pytest.raises(ValueError, match=field):
            ServeSettings(**{field: value})


def test_serve_verb_loads_the_checkpoint_and_binds_loopback(model_dir, monkeypatch, texts,
                                                            capsys):
    """``tformer serve``: flags and $TFORMER_API_KEY reach the app, uvicorn gets 127.0.0.1."""
    import uvicorn

    from tformer.cli import main

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: ran.update(app=app, **kwargs))
    monkeypatch.setenv("TFORMER_API_KEY", "env-key")
    assert main(["serve", str(model_dir), "--max-beams", "3", "--device", "cpu"]) == 0
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 8000)
    with TestClient(ran["app"]) as c:
        assert c.get("/v1/model").status_code == 401
        info = c.get("/v1/model", headers={"X-API-Key": "env-key"}).json()
        answer = c.post("/v1/generate", headers={"X-API-Key": "env-key"},
                        json={"inputs": texts[:2], "max_new_tokens": NEW}).json()
    assert info["path"] == str(model_dir) and info["limits"]["max_beams"] == 3
    assert info["limits"]["batcher_process"] is False
    reference = tformer.load(model_dir, device="cpu")
    assert answer["outputs"] == reference.generate(texts[:2], max_new_tokens=NEW)
    assert main(["serve", str(model_dir), "--batcher-process", "--device", "cpu"]) == 0
    assert ran["app"].state.settings.batcher_process  # (not started: no request was made)
    assert type(ran["app"].state.batcher).__name__ == "ProcessBatcher"
    assert main(["serve", str(model_dir), "--batcher-processes", "2", "--device", "cpu"]) == 0
    settings = ran["app"].state.settings  # N > 1 implies --batcher-process
    assert settings.batcher_process and settings.batcher_processes == 2
    assert type(ran["app"].state.batcher).__name__ == "ProcessPool"
    capsys.readouterr()
    assert main(["serve", str(model_dir), "--no-batcher-process", "--batcher-processes", "2",
                 "--device", "cpu"]) != 0
    assert "batcher_processes (2) needs batcher_process=True" in capsys.readouterr().err


def test_only_safetensors_checkpoints_are_served(reference_run, tmp_path):
    from tformer.cli import main

    newest = sorted((reference_run / "checkpoints").glob("step-*"))[-1]
    require_safetensors(newest)  # a trained checkpoint passes
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((newest / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        require_safetensors(pickled)
    assert main(["serve", str(pickled)]) == 2  # one line, exit 2, nothing loaded
    assert main(["serve", str(tmp_path / "missing")]) == 2


# -- batching ------------------------------------------------------------------------------


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


GREEDY = {"num_beams": 1, "do_sample": False, "no_repeat_ngram_size": 0, "length_penalty": 1.0,
          "max_source_length": 512}


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
    from tformer.serving.batching import _Job
    from tformer.serving.continuous import ContinuousBatcher, SlotCache, _Request

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
    loop = asyncio.new_event_loop()  # never run: the answers are read from the rows' tokens
    tokens_of, seen, rows, widths = {}, {}, None, []
    try:
        for steps, group in schedule + [(99, [])]:
            for _ in range(steps):
                if rows is None:
                    break
                order = [r.job.texts[0] for r in rows.requests]
                rows = batcher._step(rows)
                for i, text in enumerate(order):
                    seen.setdefault(text, []).append(logits[-1][i])
                if rows is not None:
                    assert cache.history == cache.lengths[: cache.n].tolist()
                    assert cache.n == len(rows) == len(cache.sources)
            if group:
                rows = batcher._admit(rows, [
                    _Request(_Job([t], {**GREEDY, "max_new_tokens": n}, loop.create_future(),
                                  loop), time.monotonic(), [None], 1) for t, n in group])
                widths.append(cache.memory.size(1))
                tokens_of.update({r.job.texts[0]: tokens  # the same list grows step by step
                                  for r, tokens in zip(rows.requests, rows.tokens)})
    finally:
        del model.output  # the fixture's model is shared
        batcher.stop()
        loop.close()
    assert rows is None and batcher.stats["joined"] == 4, batcher.stats  # c, d, e, f
    assert keeps[:3] == [[1, 2], [2, 3], [0]], keeps  # slot 0 refilled; two leave at once
    assert widths[1] > widths[0]  # the source buffers grew
    assert cache.self_kv[0][0].size(2) > SlotCache.HEADROOM  # the history grew
    for text, n in [pair for _, group in schedule for pair in group]:
        tokens = tokens_of[text]
        assert len(tokens) == n == len(seen[text])
        src = torch.tensor(own.tokenizer([text])["input_ids"])
        prefix = torch.tensor([[batcher.start_id] + tokens[:-1]])
        torch.testing.assert_close(torch.stack(seen[text]), model(src, prefix).logits[0],
                                   atol=1e-4, rtol=1e-4)


def test_continuous_batching_admits_texts_encoded_elsewhere_with_the_others(own, texts):
    """Jobs encoded beforehand (`ContinuousBatcher.encode`, as a server whose batcher runs in
    another process does) and jobs the worker encodes, admitted together with sources of
    different lengths (padded to one width), decode to the outputs of `Seq2Seq.generate`. One
    of them goes through the numpy arrays the batcher process receives (``_pack``)."""
    from tformer.serving.batching import _Job
    from tformer.serving.continuous import ContinuousBatcher, _Request
    from tformer.serving.process import _pack, _unpack

    batcher = ContinuousBatcher(own, max_batch_size=8, max_wait_ms=0, max_queue=100)
    options = {**GREEDY, "max_new_tokens": NEW}
    chosen = sorted(texts[:6], key=len)  # the encoded ones are the shortest and the longest
    jobs_texts = [chosen[0:1], chosen[1:3], chosen[5:6], chosen[3:5]]
    loop = asyncio.new_event_loop()
    try:
        encoded = {0: batcher.encode(jobs_texts[0], options),
                   2: _unpack(_pack(batcher.encode(jobs_texts[2], options)), torch.device("cpu"),
                              torch.float32)}
        jobs = [_Job(t, options, loop.create_future(), loop, encoded=encoded.get(i))
                for i, t in enumerate(jobs_texts)]
        widths = {job.encoded[2].size(1) for job in jobs if job.encoded is not None}
        assert len(widths) == 2  # two source widths to pad to one
        rows = batcher._admit(None, [_Request(j, time.monotonic(), [None] * len(j.texts),
                                              len(j.texts)) for j in jobs])
        while rows is not None:
            rows = batcher._step(rows)
        results = loop.run_until_complete(asyncio.gather(*(j.future for j in jobs)))
    finally:
        loop.close()
    for t, result in zip(jobs_texts, results):
        assert result.outputs == own.generate(t, max_new_tokens=NEW)


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
        encode, calls = batcher._encode, []

        def broken(*args):
            calls.append(batcher.stats["steps"])
            if fail and len(calls) == 2:
                raise RuntimeError("the encoder broke")
            return encode(*args)

        batcher._encode = broken
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


async def until(condition, seconds: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail instead of hanging when it never does."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.001)


@torch.inference_mode()
def test_continuous_batching_a_text_that_cannot_be_admitted_fails_alone(seq2seq, texts):
    """Newcomers are admitted together; when that fails, each is tried alone, so only the one
    at fault gets the error: the others, and the row already decoding, are answered as
    generate() answers them, and the cache stays in step with the rows."""
    from tformer.serving.batching import _Job
    from tformer.serving.continuous import ContinuousBatcher, _Request

    batcher = ContinuousBatcher(seq2seq, max_batch_size=8, max_wait_ms=0, max_queue=100)
    tokenize, groups = batcher._tokenize, []

    def broken(jobs):
        groups.append(len(jobs))
        if any(job.texts[0] == "BAD" for job in jobs):
            raise ValueError("cannot take BAD")
        return tokenize(jobs)

    batcher._tokenize = broken
    loop = asyncio.new_event_loop()  # run only to deliver the answers
    request = lambda text: _Request(_Job([text], {**GREEDY, "max_new_tokens": NEW},  # noqa: E731
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
    from tformer.serving.batching import BatcherStopped
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


def test_batching_mode_is_chosen_shown_and_validated(seq2seq):
    from tformer.serving.continuous import ContinuousBatcher

    with client(seq2seq) as c:  # auto: continuous for the own model
        assert c.get("/v1/model").json()["limits"]["batching"] == "continuous"
    with client(StubSeq2Seq()) as c:  # another engine: dynamic
        assert c.get("/v1/model").json()["limits"]["batching"] == "dynamic"
    with client(seq2seq, batching="dynamic") as c:
        assert c.get("/v1/model").json()["limits"]["batching"] == "dynamic"
    with pytest.raises(ValueError, match="own Transformer"):
        ContinuousBatcher(StubSeq2Seq(), max_batch_size=4, max_wait_ms=0, max_queue=10)
    with pytest.raises(ValueError, match="batching must be one of"):
        ServeSettings(batching="greedy")


def test_a_timed_out_request_gets_504_and_the_worker_goes_on():
    stub = StubSeq2Seq(block=("slow",))
    with TestClient(create_app(stub, settings=ServeSettings(timeout_s=0.4))) as c:
        started = time.monotonic()
        error = error_of(c.post("/v1/generate", json={"inputs": ["slow"]}), 504)
        assert time.monotonic() - started < 3
        assert (error["limit"], error["value"]) == ("timeout_s", 0.4)
        stub.release.set()  # the timed-out batch now finishes; its answer has nowhere to go
        after = c.post("/v1/generate", json={"inputs": ["fast"]})
        assert after.status_code == 200 and after.json()["outputs"] == ["FAST"]
        assert after.json()["output_tokens"] is None  # no tokenizer
        assert c.get("/healthz").status_code == 200
    assert stub.calls == [["slow"], ["fast"]]


def test_a_full_queue_is_answered_503():
    stub = StubSeq2Seq(block=("hold",))
    app = create_app(stub, settings=ServeSettings(max_queue=4, max_inputs=4, max_wait_ms=0))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            held = asyncio.ensure_future(c.post("/v1/generate", json={"inputs": ["hold"]}))
            while not stub.calls:  # the worker is busy with "hold"
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(c.post("/v1/generate", json={"inputs": list("abcd")}))
            await asyncio.sleep(0.2)
            refused = await c.post("/v1/generate", json={"inputs": ["e"]})
            stub.release.set()
            return refused, await held, await waiting

    try:
        refused, held, waiting = asyncio.run(main())
    finally:
        app.state.batcher.stop()
    error = error_of(refused, 503)
    assert (error["limit"], error["value"]) == ("max_queue", 4)
    assert refused.headers["retry-after"] == "1"
    assert held.json()["outputs"] == ["HOLD"] and waiting.json()["outputs"] == list("ABCD")


def test_attention_is_501_for_an_engine_without_maps():
    with TestClient(create_app(StubSeq2Seq())) as c:
        error = error_of(c.post("/v1/attention", json={"input": "a"}), 501)
        assert error["code"] == "attention_unavailable"
        assert c.get("/v1/model").json()["attention"] is False


def test_another_engine_is_served_through_the_same_interface(model_dir, texts):
    """The CTranslate2 engine (``tformer.load(..., engine="ctranslate2")``): batched answers
    equal its own generate(); no attention maps (501)."""
    pytest.importorskip("ctranslate2")
    engine = tformer.load(model_dir, device="cpu", engine="ctranslate2")
    with TestClient(create_app(engine)) as c:
        answer = c.post("/v1/generate", json={"inputs": texts[:4], "max_new_tokens": NEW})
        info = c.get("/v1/model").json()
        maps = c.post("/v1/attention", json={"input": texts[0]})
    assert answer.json()["outputs"] == engine.generate(texts[:4], max_new_tokens=NEW)
    assert (info["engine"], info["attention"], info["parameters"]) == ("ctranslate2", False, None)
    assert error_of(maps, 501)["code"] == "attention_unavailable"


# -- a real server on loopback -------------------------------------------------------------


@pytest.mark.parametrize("batching, process", [("continuous", 0), ("dynamic", 0),
                                               ("continuous", 1), ("continuous", 2)],
                         ids=["continuous", "dynamic", "continuous-in-a-process",
                              "continuous-in-two-processes"])
def test_load_200_requests_from_16_clients(seq2seq, texts, batching, process):
    """A real uvicorn server: every request answered, no errors, batches actually formed, and
    every output equal to generating its text alone; with the batcher in the server's process,
    in one of its own (the counters then come from the child) and in two (added up), where
    each child must have had its share."""
    expected = {t: seq2seq.generate(t, max_new_tokens=NEW) for t in texts}
    app = create_app(seq2seq, settings=ServeSettings(
        max_batch_size=16, max_wait_ms=20, batching=batching, batcher_process=process > 0,
        batcher_processes=max(process, 1)))
    jobs = [texts[i % len(texts)] for i in range(200)]

    async def drive(url: str) -> list[httpx.Response]:
        queue: asyncio.Queue = asyncio.Queue()
        for text in jobs:
            queue.put_nowait(text)
        answers: list = []

        async def client_loop(c: httpx.AsyncClient) -> None:
            while not queue.empty():
                text = queue.get_nowait()
                r = await c.post("/v1/generate", json={"inputs": [text], "max_new_tokens": NEW})
                answers.append((text, r))

        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            await asyncio.gather(*(client_loop(c) for _ in range(16)))
        return answers

    with ServerThread(app) as server:
        started = time.monotonic()
        answers = asyncio.run(drive(server.url))
        seconds = time.monotonic() - started
    stats = app.state.batcher.stats
    assert len(answers) == 200
    bad = [(t, r.status_code, r.text) for t, r in answers if r.status_code != 200]
    assert bad == []
    assert all(r.json()["outputs"] == [expected[t]] for t, r in answers)
    # the output's tokens counted the same way on every path (in a child process too)
    counts = {t: len(seq2seq.tokenizer(expected[t], add_special_tokens=False)["input_ids"])
              for t in texts}
    assert all(r.json()["output_tokens"] == [counts[t]] for t, r in answers)
    assert stats["texts"] == 200 and stats["failed"] == 0
    assert stats["largest_batch"] > 1, stats
    if batching == "dynamic":
        assert 0 < stats["generate_calls"] < 200, stats
    else:  # every request decoded step by step in the running batch, none by generate()
        assert stats["generate_calls"] == 0 and 0 < stats["steps"] < stats["row_steps"], stats
        # in a process of its own, every text encoded by the server and only joined by the child
        assert stats["pre_encoded"] == (200 if process else 0), stats
    if process == 2:
        shares = [member.stats["texts"] for member in app.state.batcher.members]
        assert min(shares) >= 20 and sum(shares) == 200, shares
    print(f"200 requests in {seconds:.1f} s, {stats}")


def _send_and_leave(url: str, body: dict) -> None:
    """A raw HTTP client that sends a full request and disconnects without reading."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


@pytest.mark.parametrize("batching, process", [("dynamic", False), ("continuous", False),
                                               ("continuous", True)],
                         ids=["dynamic", "continuous", "continuous-in-a-process"])
def test_disconnecting_clients_do_not_break_the_batch(seq2seq, texts, batching, process):
    app = create_app(seq2seq, settings=ServeSettings(max_batch_size=16, max_wait_ms=600,
                                                     batching=batching, batcher_process=process))
    stayers = texts[:6]

    async def main(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            calls = [c.post("/v1/generate", json={"inputs": [t], "max_new_tokens": NEW})
                     for t in stayers]

            async def impatient():  # gives up after 50 ms, inside the batching window
                try:
                    await c.post("/v1/generate", json={"inputs": [texts[7]], "max_new_tokens": NEW},
                                 timeout=0.05)
                except httpx.TimeoutException:
                    return
                # Continuous batching has no window: the answer may come within the 50 ms.
                assert batching == "continuous", "the request should have outlasted its timeout"

            leaver = asyncio.to_thread(_send_and_leave, url,
                                       {"inputs": [texts[8]], "max_new_tokens": NEW})
            results = await asyncio.gather(*calls, impatient(), leaver)
            after = await c.post("/v1/generate", json={"inputs": [texts[9]], "max_new_tokens": NEW})
            return results[: len(stayers)], after

    with ServerThread(app) as server:
        answers, after = asyncio.run(main(server.url))
    assert [r.status_code for r in answers] == [200] * len(stayers)
    assert [r.json()["outputs"][0] for r in answers] == [
        seq2seq.generate(t, max_new_tokens=NEW) for t in stayers]
    assert after.status_code == 200
    stats = app.state.batcher.stats
    assert stats["failed"] == 0, stats
    if batching == "dynamic":
        # The leavers' texts were never generated: their jobs were dropped before the round
        # ran (or, for a client gone before its body was read, never queued).
        assert stats["texts"] == len(stayers) + 1, stats
        assert 1 <= stats["dropped"] <= 2, stats
    else:  # no window: a leaver's row may finish before it is gone, or be dropped mid-way
        assert len(stayers) + 1 <= stats["texts"] <= len(stayers) + 3, stats
        assert stats["texts"] + stats["dropped"] <= len(stayers) + 3, stats


# -- the batcher in a process of its own ---------------------------------------------------


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


def test_batcher_pool_with_a_dead_child_serves_from_the_others(seq2seq, texts):
    """Two batcher processes, one killed: /healthz says 503 (the server is degraded), and
    every later request is answered by the live child, with the same outputs."""
    app = create_app(seq2seq, settings=ServeSettings(batcher_process=True, batcher_processes=2,
                                                     timeout_s=120))
    body = {"inputs": texts[:2], "max_new_tokens": NEW}
    expected = seq2seq.generate(texts[:2], max_new_tokens=NEW)
    with ServerThread(app) as server:
        pool = app.state.batcher
        assert type(pool).__name__ == "ProcessPool" and len(pool.members) == 2
        # one encoding thread for both (the tokenizer is not thread-safe)
        assert pool.members[0]._model_thread is pool.members[1]._model_thread
        assert httpx.get(server.url + "/healthz").status_code == 200
        pool.members[0]._process.kill()
        deadline = time.monotonic() + 30
        while not pool.members[0]._ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert error_of(httpx.get(server.url + "/healthz"), 503)["code"] == "worker_down"
        for _ in range(3):
            answer = httpx.post(server.url + "/v1/generate", json=body, timeout=60)
            assert answer.status_code == 200 and answer.json()["outputs"] == expected
        assert pool.members[1].stats["texts"] == 6


def test_batcher_processes_needs_batcher_process():
    with pytest.raises(ValueError, match=r"batcher_processes \(2\) needs batcher_process"):
        ServeSettings(batcher_processes=2)
    with pytest.raises(ValueError, match="batcher_processes must be an integer >= 1"):
        ServeSettings(batcher_process=True, batcher_processes=0)


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


# -- schemathesis --------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(seq2seq):
    """Every operation of the OpenAPI schema, with valid and invalid data (a few derandomized
    examples each, so it stays bounded and repeatable), under every check schemathesis has (as
    ``--checks all``): no 5xx, every answer conforms to the schema (documented status, content
    type, headers, body), data the schema calls valid is accepted (an integral float such as
    ``0.0`` for an integer field too) and data it calls invalid is refused."""
    from schemathesis.checks import CHECKS, load_all_checks
    from schemathesis.config import ChecksConfig, SchemathesisConfig

    load_all_checks()
    # The server states its caps in the schema (maximum, maxItems, maxLength) and answers a
    # size over them with 413, a rejection schemathesis does not list by default; the token
    # cap (413 input_too_long) has no JSON Schema form, so a schema-valid text may exceed it.
    defaults = ChecksConfig()
    accepted = [*defaults.positive_data_acceptance.expected_statuses, "413"]
    rejected = [*defaults.negative_data_rejection.expected_statuses, "413"]
    config = SchemathesisConfig.from_dict({"checks": {
        "positive_data_acceptance": {"expected-statuses": accepted},
        "negative_data_rejection": {"expected-statuses": rejected}}})

    small = ServeSettings(max_inputs=4, max_input_chars=200, max_input_tokens=64,
                          max_new_tokens_cap=6, max_beams=2)
    app = create_app(seq2seq, settings=small)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    checks = CHECKS.get_all()
    statuses: dict[str, set[int]] = {}
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            modes = [GenerationMode.POSITIVE]
            if operation.method.upper() == "POST":  # a GET without parameters has no invalid form
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                seen = statuses.setdefault(operation.label, set())
                _fuzz(operation.as_strategy(generation_mode=mode), checks, seen)
    finally:
        app.state.batcher.stop()
    assert set(statuses) == {"GET /healthz", "GET /v1/model", "POST /v1/generate",
                             "POST /v1/attention"}
    assert 200 in statuses["POST /v1/generate"] and 422 in statuses["POST /v1/generate"]


def _fuzz(strategy, checks: list, seen: set[int]) -> None:
    """Run ``checks`` on a few derandomized cases drawn from ``strategy``."""

    @given(case=strategy)
    @settings(max_examples=10, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        seen.add(case.call_and_validate(checks=checks).status_code)

    check()
