"""A real uvicorn server on loopback: the ``tformer serve`` verb, safetensors only, a bounded
load test (every output equal to one at a time) and clients that disconnect, with each batcher."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

import tformer
from tformer.serving import ServerThread, ServeSettings, create_app, require_safetensors

from . import serving_helpers as helpers
from .serving_helpers import NEW

#: The shared fixtures (`tests/serving_helpers.py`), found by name.
model_dir, seq2seq, texts = helpers.model_dir, helpers.seq2seq, helpers.texts


def test_serve_verb_loads_the_checkpoint_and_binds_loopback(model_dir, monkeypatch, texts):
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


@pytest.mark.parametrize("batching, process", [("continuous", False), ("dynamic", False),
                                               ("continuous", True)],
                         ids=["continuous", "dynamic", "continuous-in-a-process"])
def test_load_200_requests_from_16_clients(seq2seq, texts, batching, process):
    """A real uvicorn server: every request answered, no errors, batches actually formed, and
    every output equal to generating its text alone; with the batcher in the server's process
    and in one of its own (the counters then come from the child)."""
    expected = {t: seq2seq.generate(t, max_new_tokens=NEW) for t in texts}
    app = create_app(seq2seq, settings=ServeSettings(
        max_batch_size=16, max_wait_ms=20, batching=batching, batcher_process=process))
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
