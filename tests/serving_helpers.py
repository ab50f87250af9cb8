"""What the serving tests (``tests/test_serving_*.py``) share: a model whose outputs differ from
input to input and its texts (as fixtures, which each test module imports by name), a client
and an error reader, and stub engines whose speed or failures the test controls."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import tformer
from tformer.serving import ServeSettings, create_app

NEW = 8  # max_new_tokens in these tests: the model is tiny, outputs are short

#: The options of a greedy request as the server resolves them (for the batchers driven
#: directly, without the app).
GREEDY = {"num_beams": 1, "do_sample": False, "no_repeat_ngram_size": 0, "length_penalty": 1.0,
          "max_source_length": 512}


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
    """A TestClient of an app around ``seq2seq`` with these `ServeSettings`."""
    return TestClient(create_app(seq2seq, settings=ServeSettings(**overrides)))


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


async def until(condition, seconds: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail instead of hanging when it never does."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.001)


def served_checkpoint(reference_run: Path, out: Path, copy_attention: bool = False) -> Path:
    """A checkpoint with the reference run's config (with copy attention if asked) and
    tokenizer and freshly initialised weights (seed 1, matrices scaled by 3), saved as
    safetensors.

    Why not the trained weights themselves: after 12 steps the model answers every input with
    end-of-sequence at once (empty outputs), so a mix-up between requests in a batch could not
    show. This one gives mostly different outputs of different lengths for different inputs.
    """
    from tformer.hf import TformerForConditionalGeneration

    newest = sorted((reference_run / "checkpoints").glob("step-*"))[-1]
    trained = tformer.load(newest, device="cpu")
    config = trained.model.config
    config.copy_attention = copy_attention
    torch.manual_seed(1)
    model = TformerForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(3.0)
    model.save_pretrained(out)  # config.json + model.safetensors
    trained.tokenizer.save_pretrained(out)
    return out


def source_texts(data_files: dict[str, Path], n: int = 16) -> list[str]:
    """The first ``n`` sources of the validation file (English Multi30k captions)."""
    lines = data_files["validation"].read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["source"] for line in lines[:n]]


class StubSeq2Seq:
    """An engine with the ``generate`` interface and no PyTorch model or tokenizer: outputs are
    the inputs upper-cased. Calls whose first text is in ``block`` wait for ``release``."""

    tokenizer = None

    def __init__(self, block: tuple[str, ...] = ()) -> None:
        self.block = block
        self.release = threading.Event()
        self.calls: list[list[str]] = []
        self.path = "stub"

    def generate(self, texts, *, max_new_tokens: int, **options) -> list[str]:
        self.calls.append(list(texts))
        if texts and texts[0] in self.block:
            self.release.wait(10)
        return [text.upper() for text in texts]


class TwoArgumentError(Exception):
    """An exception that pickles but does not unpickle (its ``__init__`` takes two arguments,
    its ``args`` hold one), as some libraries' exceptions do."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} (code {code})")


class UpperSeq2Seq:
    """A picklable engine without a PyTorch model (for a batcher in another process): outputs
    are the inputs upper-cased; the text "fail" raises `TwoArgumentError`."""

    tokenizer = None
    path = "upper"

    def generate(self, texts, *, max_new_tokens: int, **options) -> list[str]:
        if "fail" in texts:
            raise TwoArgumentError("cannot generate", 7)
        return [text.upper() for text in texts]


def wordy(url: str, texts: list[str], max_tokens: int = 64, key: str = "") -> list[str]:
    """Eight texts, those whose greedy output (at ``url``) has the most words first. This
    random model's outputs are often runs of byte-fallback tokens, whose text shows only once
    the run ends (`tformer.serving.text_stream`); the wordiest stream in the most pieces."""
    answer = httpx.post(url + "/v1/completions", timeout=120,
                        headers={"Authorization": f"Bearer {key}"} if key else {}, json={
        "prompt": texts[:8], "max_tokens": max_tokens, "temperature": 0}).json()
    words = [len(choice["text"].split()) for choice in answer["choices"]]
    return [text for _, text in sorted(zip(words, texts), key=lambda pair: -pair[0])]
