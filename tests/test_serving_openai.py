"""The OpenAI-compatible routes (`tformer.serving.openai_api`) driven by clients no one here
wrote: the official ``openai`` package and ``curl -N``, against a live uvicorn server on
loopback. Greedy answers equal `Seq2Seq.generate`; a streamed answer equals the non-streamed
one; tokens reach the client as the continuous batcher decodes them; a client that leaves
frees its batch slot; errors are OpenAI's, raised by the client as its typed errors."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from tformer.generation import Seq2Seq
from tformer.serving import ServerThread, ServeSettings, create_app
from tformer.serving.openai_api import model_family

from . import serving_helpers as helpers
from .serving_helpers import NEW, StubSeq2Seq, until, wordy

#: The shared fixtures (`tests/serving_helpers.py`), found by name.
model_dir, seq2seq, texts = helpers.model_dir, helpers.seq2seq, helpers.texts

KEY = "openai-test-key"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"


@pytest.fixture(scope="module")
def server(seq2seq):
    """One live server for the module: the API key set, the default model name."""
    app = create_app(seq2seq, settings=ServeSettings(api_key=KEY, max_new_tokens_cap=200,
                                                     max_inputs=8))
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def reasons_of(seq2seq, prompts: list[str], max_new: int) -> list[str]:
    """"stop" where Hugging Face generate() ends a text with end-of-sequence, else "length"."""
    eos = seq2seq.model.generation_config.eos_token_id
    out = []
    for prompt in prompts:
        enc = seq2seq.tokenizer([prompt], return_tensors="pt")
        ids = seq2seq.model.generate(**enc, max_new_tokens=max_new)[0, 1:].tolist()
        out.append("stop" if eos in ids else "length")
    return out


def test_models_are_listed_and_retrieved(client, model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_dir.name]  # the checkpoint directory's name
    assert client.models.retrieve(model_dir.name).id == model_dir.name
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4")
    assert error.value.code == "model_not_found"


def test_greedy_completions_equal_generate_with_usage_and_finish_reasons(client, seq2seq,
                                                                         texts, model_dir):
    prompts = texts[:4]
    answer = client.completions.create(model=model_dir.name, prompt=prompts, max_tokens=NEW,
                                       temperature=0)
    tokenizer = seq2seq.tokenizer
    outputs = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    assert outputs == seq2seq.generate(prompts, max_new_tokens=NEW)
    assert len(set(outputs)) > 1
    assert [c.finish_reason for c in answer.choices] == reasons_of(seq2seq, prompts, NEW)
    assert answer.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert answer.usage.completion_tokens == sum(
        len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.object == "text_completion" and answer.model == model_dir.name


def test_logprobs_of_an_encoder_decoder_model_equal_a_teacher_forced_pass(client, seq2seq,
                                                                         texts):
    """``logprobs: 2`` on a greedy completion: each token's log-probability is the
    log-softmax of one teacher-forced forward pass (the source; the start token and the
    answer), to 1e-4, and its likeliest alternative is the token itself."""
    answer = client.completions.create(model=None, prompt=texts[0], max_tokens=NEW,
                                       temperature=0, logprobs=2)
    enc = seq2seq.tokenizer([texts[0]], return_tensors="pt")
    ids = seq2seq.model.generate(**enc, max_new_tokens=NEW)[0].tolist()  # the start token first
    with torch.no_grad():
        logits = seq2seq.model(**enc, decoder_input_ids=torch.tensor([ids[:-1]])).logits[0]
    expected = logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    scored = answer.choices[0].logprobs
    assert scored.tokens == [seq2seq.tokenizer.decode([i]) for i in ids[1:]]
    torch.testing.assert_close(torch.tensor(scored.token_logprobs), expected, atol=1e-4, rtol=0)
    assert [next(iter(top)) for top in scored.top_logprobs] == scored.tokens


def test_a_streamed_answer_equals_the_non_streamed_one(client, texts):
    """Greedy, 3 prompts in one request: the chunks of each choice add up to its non-streamed
    text, its last chunk carries its finish reason, and include_usage adds the same usage."""
    prompts = texts[4:7]
    whole = client.completions.create(model=None, prompt=prompts, max_tokens=40, temperature=0)
    pieces, reasons, usage, chunks = {}, {}, None, 0
    for chunk in client.completions.create(prompt=prompts, max_tokens=40, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           model=None):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            chunks += 1
            pieces[choice.index] = pieces.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert [pieces[i] for i in range(3)] == [c.text for c in whole.choices]
    assert [reasons[i] for i in range(3)] == [c.finish_reason for c in whole.choices]
    assert usage == whole.usage
    assert chunks > 6  # token by token, not one chunk per choice


def test_n_seed_and_top_p(client, seq2seq, texts):
    """n choices of one prompt differ; a seed gives the same choices again, streamed or not;
    another seed others; top_p so small that only the likeliest token is left is greedy."""
    ask = dict(prompt=texts[0], max_tokens=NEW, n=3, temperature=1.0, model=None)
    first = [c.text for c in client.completions.create(seed=11, **ask).choices]
    again = [c.text for c in client.completions.create(seed=11, **ask).choices]
    other = [c.text for c in client.completions.create(seed=12, **ask).choices]
    streamed = {}
    for chunk in client.completions.create(seed=11, stream=True, **ask):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert len(first) == 3 and len(set(first)) > 1
    assert again == first and [streamed[i] for i in range(3)] == first
    assert other != first
    nucleus = client.completions.create(prompt=texts[:3], max_tokens=NEW, top_p=1e-9,
                                        temperature=1.0, model=None)
    assert [c.text for c in nucleus.choices] == seq2seq.generate(texts[:3], max_new_tokens=NEW)


def test_stop_sequences_cut_the_completion_streamed_or_not(client, seq2seq, texts):
    text = next(t for t in texts if len(seq2seq.generate(t, max_new_tokens=30).split()) >= 3)
    full = seq2seq.generate(text, max_new_tokens=30)
    stop = full.split()[1]
    expected = full[: full.find(stop)]
    whole = client.completions.create(prompt=text, max_tokens=30, temperature=0,
                                      stop=[stop, "\u2603never"], model=None, logprobs=1)
    chunks = [c.choices[0] for c in client.completions.create(
        prompt=text, max_tokens=30, temperature=0, stop=stop, stream=True, model=None,
        logprobs=1) if c.choices]
    streamed = "".join(c.text for c in chunks)
    assert whole.choices[0].text == expected == streamed
    assert whole.choices[0].finish_reason == "stop"
    # the tokens scored are the same both ways: up to the one that completed the stop sequence
    # (the batcher decoded one more before the row left; neither answer lists it)
    scored = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert whole.choices[0].logprobs.tokens == scored
    assert "".join(scored).startswith(expected.strip()) and stop in "".join(scored)


def test_errors_are_openais_and_raised_as_the_clients_typed_errors(server, client, model_dir):
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="gpt-4", prompt="a")
    assert error.value.param == "model"
    cases = [(dict(temperature=5e-5), "temperature"), (dict(max_tokens=201), "max_tokens"),
             (dict(echo=True), "echo"), (dict(top_p=0), "top_p"),
             (dict(presence_penalty=0.5), "presence_penalty"), (dict(logprobs=6), "logprobs"),
             (dict(extra_body={"beams": 2}), "beams")]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model=model_dir.name, prompt="a", **fields)
        assert error.value.param == param, fields
        assert set(error.value.body) == {"message", "type", "param", "code"}
        assert error.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as error:  # today's checkpoints have no template
        client.chat.completions.create(model=model_dir.name,
                                       messages=[{"role": "user", "content": "A dog runs."}])
    assert error.value.code == "chat_template_missing" and error.value.param == "messages"
    with pytest.raises(openai.APIStatusError) as error:  # prompts x n over max_inputs (8)
        client.completions.create(model=None, prompt=["a", "b", "c"], n=3)
    assert error.value.status_code == 413 and error.value.param == "n"


def test_the_own_routes_keep_their_error_format(server):
    """The OpenAI routes answer a bad field 400 in OpenAI's form; /v1/generate 422 in its own."""
    headers = {"Authorization": f"Bearer {KEY}"}
    own = httpx.post(server.url + "/v1/generate", headers=headers,
                     json={"inputs": ["a"], "temperature": 0.0})
    ours = httpx.post(server.url + "/v1/completions", headers=headers,
                      json={"prompt": "a", "temperature": 5e-5})
    assert own.status_code == 422 and set(own.json()["error"]) >= {"code", "message", "details"}
    assert ours.status_code == 400 and set(ours.json()["error"]) == {"message", "type", "param",
                                                                     "code"}
    too_big = httpx.post(server.url + "/v1/completions", headers=headers,
                         content=b'{"prompt": "' + b"x" * 600_000 + b'"}')
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "invalid_request_error"


def test_chat_renders_the_tokenizers_template(seq2seq, texts):
    """A tokenizer with a chat template: the answer is the completion of the rendered
    messages, streamed or not; the stream opens with the assistant's role."""
    tokenizer = copy.deepcopy(seq2seq.tokenizer)
    tokenizer.chat_template = TEMPLATE
    chatty = Seq2Seq(seq2seq.model, tokenizer, seq2seq.path)
    messages = [{"role": "system", "content": texts[0]}, {"role": "user", "content": texts[1]}]
    with ServerThread(create_app(chatty, settings=ServeSettings(model_name="chatty"))) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model="chatty", messages=messages, max_tokens=NEW,
                                                temperature=0)
        chunks = list(client.chat.completions.create(model="chatty", messages=messages,
                                                     max_tokens=NEW, temperature=0, stream=True))
    prompt = f"{texts[0]} {texts[1]}"
    assert answer.choices[0].message.content == seq2seq.generate(prompt, max_new_tokens=NEW)
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(seq2seq.tokenizer(prompt)["input_ids"])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        answer.choices[0].message.content)
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def _no_eos(app) -> None:
    """Every row of the app's continuous batcher decodes to its max_tokens."""
    app.state.batcher.eos_ids = set()


def test_a_client_that_leaves_mid_stream_frees_its_slot(seq2seq, texts):
    """The client reads a few chunks and closes the connection: its row leaves the batch at the
    next step (dropped, never answered). Steps are slowed to 10 ms, so that 200 of them
    outlast the client."""
    app = create_app(seq2seq, settings=ServeSettings())
    _no_eos(app)
    batcher, stats = app.state.batcher, app.state.batcher.stats
    step = batcher._step
    batcher._step = lambda rows: time.sleep(0.01) or step(rows)

    async def main(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async with c.stream("POST", "/v1/completions", json={
                    "prompt": texts[0], "max_tokens": 200, "temperature": 0, "stream": True}):
                await until(lambda: stats["steps"] >= 3)
            # the response is closed here, unread: the client has gone
            await until(lambda: stats["active"] == 0 and stats["dropped"] == 1)

    with ServerThread(app) as server:
        asyncio.run(main(server.url))
    assert stats["row_steps"] < 200 and stats["texts"] == 0, stats


def test_streaming_and_whole_requests_share_one_batch(seq2seq, texts):
    """A streamed completion, a whole one and a /v1/generate request at once: one running
    batch (never generate()), and each answer as if it ran alone."""
    app = create_app(seq2seq, settings=ServeSettings())
    _no_eos(app)

    async def main(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def streamed() -> str:
                text = ""
                async with c.stream("POST", "/v1/completions", json={
                        "prompt": texts[0], "max_tokens": 30, "temperature": 0,
                        "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text

            whole = c.post("/v1/completions", json={"prompt": texts[1], "max_tokens": 30,
                                                    "temperature": 0})
            own = c.post("/v1/generate", json={"inputs": [texts[2]], "max_new_tokens": 30})
            return await asyncio.gather(streamed(), whole, own)

    with ServerThread(app) as server:
        streamed, whole, own = asyncio.run(main(server.url))
        alone = [httpx.post(server.url + "/v1/generate", json={
            "inputs": [t], "max_new_tokens": 30}).json()["outputs"][0] for t in texts[:3]]
    stats = app.state.batcher.stats
    assert [streamed, whole.json()["choices"][0]["text"], own.json()["outputs"][0]] == alone
    assert stats["generate_calls"] == 0 and stats["largest_batch"] >= 2, stats
    assert own.json()["batch_inputs"] >= 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_streams_server_sent_events(server, texts):
    """``curl -N`` (no buffering) with the key as a bearer token: data: lines, one JSON chunk
    each, ended by data: [DONE]; the texts add up to the non-streamed answer."""
    prompt = wordy(server.url, texts, 30, KEY)[0]
    body = json.dumps({"prompt": prompt, "max_tokens": 30, "temperature": 0, "stream": True})
    done = subprocess.run(["curl", "-sS", "-N", "--max-time", "120", server.url + "/v1/completions",
                           "-H", f"Authorization: Bearer {KEY}",
                           "-H", "Content-Type: application/json", "-d", body],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    events = [line for line in done.stdout.split("\n") if line]
    assert all(line.startswith("data: ") for line in events), done.stdout
    assert events[-1] == "data: [DONE]" and len(events) > 3
    streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    whole = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"prompt": prompt, "max_tokens": 30, "temperature": 0}).json()
    assert streamed == whole["choices"][0]["text"]


@pytest.mark.parametrize("batching, process", [("dynamic", False), ("continuous", True)],
                         ids=["dynamic", "continuous-in-a-process"])
def test_other_batchers_stream_the_same_answer(seq2seq, texts, batching, process):
    """The dynamic batcher streams its answer as one chunk per choice; the continuous one in a
    process of its own relays every token. Either way the text equals generate()'s."""
    app = create_app(seq2seq, settings=ServeSettings(batching=batching, batcher_process=process))
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        prompts = wordy(server.url, texts, NEW)[:2]
        chunks = [c for c in client.completions.create(prompt=prompts, max_tokens=NEW,
                                                       temperature=0, stream=True, model=None)]
        sampled = [client.completions.create(prompt=texts[0], max_tokens=NEW, n=2, seed=5,
                                             model=None).choices for _ in range(2)]
    pieces = {}
    for chunk in chunks:
        for choice in chunk.choices:
            pieces.setdefault(choice.index, []).append(choice.text)
    expected = seq2seq.generate(prompts, max_new_tokens=NEW)
    assert ["".join(pieces[i]) for i in range(2)] == expected
    if batching == "dynamic":
        assert all(len([p for p in pieces[i] if p]) <= 1 for i in range(2)), pieces
    else:
        assert max(len(pieces[i]) for i in range(2)) > 2, pieces
    assert [c.text for c in sampled[0]] == [c.text for c in sampled[1]]  # seeded


def test_the_model_family_decides_how_a_prompt_is_read(seq2seq):
    """One place decides: an encoder-decoder model reads the prompt as its source (echo is
    refused, above); an engine that says it is decoder-only continues it, and echo prepends
    the prompt (here a stub engine; tformer's decoder-only models: tests/test_serving_causal.py)."""

    class Continuing(StubSeq2Seq):
        family = "causal"

        def generate(self, texts, *, max_new_tokens: int, **options):
            return [" and more" for _ in texts]

    assert model_family(seq2seq) == "seq2seq"
    engine = Continuing()
    assert model_family(engine) == "causal"
    with ServerThread(create_app(engine)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        echoed = client.completions.create(model="stub", prompt="Once", echo=True, max_tokens=3,
                                           temperature=0)
        plain = client.completions.create(model="stub", prompt="Once", max_tokens=3,
                                          temperature=0)
    assert echoed.choices[0].text == "Once and more" and plain.choices[0].text == " and more"


def test_tokens_reach_the_client_before_the_answer_ends(seq2seq, texts):
    """64 tokens, streamed: the first chunk arrives well before the last (as decoded, not
    after the batch)."""
    app = create_app(seq2seq, settings=ServeSettings())
    _no_eos(app)
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        prompt = wordy(server.url, texts)[0]
        started = time.monotonic()
        arrivals = [time.monotonic() for c in client.completions.create(
            prompt=prompt, max_tokens=64, temperature=0, stream=True, model=None)
            if c.choices and c.choices[0].text]
        ended = time.monotonic()
    assert len(arrivals) > 8
    assert arrivals[0] - started < 0.5 * (ended - started), (arrivals[0] - started, ended - started)


def test_the_bearer_key_and_the_model_name_setting(seq2seq):
    app = create_app(seq2seq, settings=ServeSettings(api_key="k", model_name="my-model"))
    with ServerThread(app) as server:
        models = OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0).models.list()
        refused = httpx.get(server.url + "/v1/models", headers={"X-API-Key": "other"})
    assert [m.id for m in models.data] == ["my-model"]
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
