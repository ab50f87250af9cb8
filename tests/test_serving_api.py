"""tformer serve's routes against `Seq2Seq.generate` and the attention maps: outputs and
counts, model info, the page, another engine, the batching mode shown, and schemathesis on the
OpenAPI schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

import tformer
from tformer.generation import Seq2Seq
from tformer.serving import ServeSettings, create_app
from tformer.serving.app import STATIC_DIR

from . import serving_helpers as helpers
from .serving_helpers import NEW, StubSeq2Seq, client, error_of

#: The shared fixtures (`tests/serving_helpers.py`), found by name.
copy_seq2seq, model_dir, seq2seq, texts = (
    helpers.copy_seq2seq, helpers.model_dir, helpers.seq2seq, helpers.texts)


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


def test_schemathesis_finds_no_server_error(seq2seq):
    """Every operation of the OpenAPI schema (the OpenAI-compatible ones too, streamed or
    not), with valid and invalid data (a few derandomized
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
    # A tokenizer with a chat template, so that chat requests the schema calls valid can be
    # answered (without one, every chat request is a 400: tests/test_serving_openai.py).
    tokenizer = copy.deepcopy(seq2seq.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    app = create_app(Seq2Seq(seq2seq.model, tokenizer, seq2seq.path), settings=small)
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
                             "POST /v1/attention", "GET /v1/models", "GET /v1/models/{model}",
                             "POST /v1/completions", "POST /v1/chat/completions"}
    assert 200 in statuses["POST /v1/generate"] and 422 in statuses["POST /v1/generate"]
    assert 200 in statuses["POST /v1/completions"] and 400 in statuses["POST /v1/completions"]


def _fuzz(strategy, checks: list, seen: set[int]) -> None:
    """Run ``checks`` on a few derandomized cases drawn from ``strategy``."""

    @given(case=strategy)
    @settings(max_examples=10, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        seen.add(case.call_and_validate(checks=checks).status_code)

    check()
