"""tformer serve's limits, each answered with the setting it names; malformed requests; the
API key; the settings' validation; a timed-out request (504) and a full queue (503)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi.testclient import TestClient

import tformer
from tformer.hf import TformerConfig, TformerForConditionalGeneration
from tformer.model import config_for
from tformer.serving import ServeSettings, create_app
from tformer.serving.settings import resolve_api_key
from tformer.tokenization import train_tokenizer

from . import serving_helpers as helpers
from .serving_helpers import StubSeq2Seq, client, error_of

#: The shared fixtures (`tests/serving_helpers.py`), found by name.
model_dir, seq2seq = helpers.model_dir, helpers.seq2seq

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


def test_a_request_longer_than_the_decoders_position_table_is_refused_naming_the_field(
        tmp_path):
    """An encoder-decoder with learned positions (a table of 16) cannot write 17 tokens: the
    server lowers max_new_tokens_cap to its table, so every route answers 4xx naming the
    field, never a 500; 16 tokens, and the default, are answered."""
    texts = ["a dog runs in the park", "the cat sleeps on a mat", "two men play ball"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=400, kind="bpe")
    core = config_for("tiny", len(tokenizer), None, positional="learned", max_positions=16)
    TformerForConditionalGeneration(TformerConfig.from_transformer_config(core)).save_pretrained(
        tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with TestClient(create_app(tformer.load(tmp_path, device="cpu"))) as api:
        for path, body, param in (
                ("/v1/completions", {"prompt": "a dog", "max_tokens": 17}, "max_tokens"),
                ("/v1/completions", {"prompt": "a dog", "max_tokens": 17, "logprobs": 2},
                 "max_tokens")):
            answer = api.post(path, json=body)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param
            assert "max_new_tokens_cap is 16" in answer.json()["error"]["message"]
        assert error_of(api.post("/v1/generate", json={"inputs": ["a dog"], "max_new_tokens": 17}),
                        422)["limit"] == "max_new_tokens_cap"
        for body in ({"prompt": "a dog", "max_tokens": 16, "temperature": 0, "logprobs": 1},
                     {"prompt": "a dog"}):
            assert api.post("/v1/completions", json=body).status_code == 200
        assert api.post("/v1/generate", json={"inputs": ["a dog"]}).status_code == 200
