"""The `Batcher` protocol (`tformer.serving.batcher`): every batcher implements it, with the
protocol's signatures; the app takes any object that does; and no serving module imports
another's private names."""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path

import pytest

import tformer.serving
from tformer.serving import ServeSettings, create_app
from tformer.serving.app import make_batcher
from tformer.serving.batcher import Batcher, BatchResult, TokenStream
from tformer.serving.batching import DynamicBatcher
from tformer.serving.continuous import ContinuousBatcher
from tformer.serving.process import ProcessBatcher

from . import serving_helpers as helpers
from .serving_helpers import NEW, StubSeq2Seq, UpperSeq2Seq, client

#: The shared fixtures (`tests/serving_helpers.py`), found by name.
model_dir, seq2seq, texts = helpers.model_dir, helpers.seq2seq, helpers.texts

SIZES = dict(max_batch_size=4, max_wait_ms=0, max_queue=10)
METHODS = ("start", "submit", "stream", "call", "stop")


def batchers(seq2seq) -> list:
    """One of each batcher, built and not started."""
    return [DynamicBatcher(StubSeq2Seq(), **SIZES), ContinuousBatcher(seq2seq, **SIZES),
            ProcessBatcher(UpperSeq2Seq(), kind="dynamic", **SIZES),
            ProcessBatcher(seq2seq, kind="continuous", **SIZES)]


def test_every_batcher_satisfies_the_protocol(seq2seq):
    """Each batcher is a `Batcher` (runtime check of its members) whose methods take the
    protocol's parameters, with the same defaults, and whose ``healthy`` is a property."""
    for batcher in batchers(seq2seq):
        try:
            assert isinstance(batcher, Batcher), type(batcher).__name__
            assert batcher.mode in ("continuous", "dynamic") and isinstance(batcher.stats, dict)
            assert isinstance(type(batcher).healthy, property) and batcher.healthy
            for name in METHODS:
                ours = inspect.signature(getattr(Batcher, name)).parameters
                theirs = inspect.signature(getattr(type(batcher), name)).parameters
                assert [(p.name, p.kind, p.default) for p in theirs.values()] == [
                    (p.name, p.kind, p.default) for p in ours.values()], (type(batcher), name)
        finally:
            batcher.stop()


def test_make_batcher_returns_a_batcher_for_every_setting(seq2seq):
    for batching in ("auto", "continuous", "dynamic"):
        for process in (False, True):
            batcher = make_batcher(seq2seq, ServeSettings(batching=batching,
                                                          batcher_process=process))
            try:
                assert isinstance(batcher, Batcher)
                assert batcher.mode == ("dynamic" if batching == "dynamic" else "continuous")
            finally:
                batcher.stop()


class EchoBatcher:
    """A batcher of its own, written against the protocol alone: answers at once, reversed."""

    mode = "dynamic"

    def __init__(self) -> None:
        self.stats = {"texts": 0}
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    @property
    def healthy(self) -> bool:
        return not self.stopped

    def submit(self, texts, options) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.stats["texts"] += len(texts)
        future.set_result(BatchResult(outputs=[t[::-1] for t in texts], output_tokens=None,
                                      batch_inputs=len(texts), queue_ms=0.0, generate_ms=0.0))
        return future

    def stream(self, texts, options) -> TokenStream:
        stream = TokenStream(asyncio.get_running_loop())
        stream.future = self.submit(texts, options)
        return stream

    def call(self, fn) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        future.set_result(fn())
        return future

    def stop(self, timeout: float = 10.0) -> None:
        self.stopped = True


def test_the_app_serves_through_any_batcher():
    """`create_app` depends on the protocol only: a batcher it has never heard of serves
    /v1/generate, /v1/completions (streamed too: one chunk, at the end) and /healthz, and is
    started and stopped with the app."""
    from fastapi.testclient import TestClient

    echo = EchoBatcher()
    assert isinstance(echo, Batcher)
    app = create_app(StubSeq2Seq(), batcher=echo)
    with TestClient(app) as c:
        assert echo.started
        answer = c.post("/v1/generate", json={"inputs": ["abc", "de"], "max_new_tokens": NEW})
        assert answer.json()["outputs"] == ["cba", "ed"]
        completion = c.post("/v1/completions", json={"prompt": ["abc"], "temperature": 0})
        assert completion.json()["choices"][0]["text"] == "cba"
        streamed = c.post("/v1/completions", json={"prompt": "abc", "stream": True}).text
        assert '"text":"cba"' in streamed and streamed.endswith("data: [DONE]\n\n")
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/model").json()["limits"]["batching"] == "dynamic"
    assert echo.stopped and echo.stats["texts"] == 4


def test_the_default_batcher_is_still_chosen_by_the_settings(seq2seq):
    with client(seq2seq, batching="dynamic") as c:
        assert type(c.app.state.batcher) is DynamicBatcher


@pytest.mark.parametrize("path", sorted(Path(tformer.serving.__file__).parent.glob("*.py")),
                         ids=lambda path: path.name)
def test_serving_modules_import_no_private_names(path):
    """What one module shares with another is a public name of the module that owns it."""
    private = [f"{node.module}.{alias.name}" for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tformer")
               for alias in node.names if alias.name.startswith("_")]
    assert private == []
