"""Continuous batching of tformer's decoder-only models (`tformer.serving.families.DecoderOnly`),
for both presets: gpt2 (learned positions) and llama (RoPE, grouped-query attention). The
reference is Hugging Face ``generate()`` on the same model: greedy tokens equal its tokens as
prompts of different lengths join a running batch, and every step's logits equal a plain forward
pass over the prompt and the tokens so far; a seeded sampled request gives the same tokens alone
and in a busy batch; a client that leaves frees its slot; a prompt longer than the context
answers as ``generate()`` answers it (the window slides); and through the ``openai`` client,
chat and text completions of a checkpoint with a chat template, streamed equal to whole."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch
from openai import OpenAI

import tformer
from tformer.serving import ServerThread, ServeSettings, create_app
from tformer.serving.continuous import ContinuousBatcher

from .serving_helpers import GREEDY, causal_checkpoint, drive, until
from .synthetic import captions


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def causal(request, tmp_path_factory) -> tformer.Seq2Seq:
    """A tiny decoder-only checkpoint of each preset (64 positions), loaded as the server
    loads one."""
    corpus = [text for record in captions(200) for text in (record["source"], record["target"])]
    out = tmp_path_factory.mktemp(f"causal-{request.param}")
    return tformer.load(causal_checkpoint(corpus, out, request.param), device="cpu")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Prompts of different lengths, the empty one (read as the end-of-text token) included."""
    sources = [record["source"] for record in captions(12, seed=5)]
    return [" ".join(text.split()[: 1 + i % 7]) for i, text in enumerate(sources)] + [""]


def prompt_ids(seq2seq, prompt: str) -> list[int]:
    """``prompt`` as `tformer.generation.continue_prompts` encodes it."""
    tokenizer = seq2seq.tokenizer
    return tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]


def generated(seq2seq, prompt: str, max_new_tokens: int) -> list[int]:
    """Hugging Face ``generate()``'s greedy tokens continuing ``prompt`` alone."""
    ids = torch.tensor([prompt_ids(seq2seq, prompt)])
    out = seq2seq.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=seq2seq.tokenizer.pad_token_id)
    return out[0, ids.size(1):].tolist()


def test_the_presets_are_the_two_position_schemes(causal):
    config = causal.model.config
    if config.positional == "rope":
        assert config.n_kv_heads < config.n_heads  # llama: grouped-query attention
    else:
        assert config.positional == "learned"


@torch.inference_mode()
def test_rows_joining_a_running_batch_decode_as_generate_does(causal, prompts):
    """The batcher's steps driven by hand: prompts of different lengths (one token only, for the
    empty prompt) join a batch that is decoding, rows leave and their slots are refilled. Every
    row's tokens equal ``generate()``'s for its prompt alone, and at every step its logits equal
    a forward pass over its prompt and the tokens produced so far, with no cache."""
    batcher = ContinuousBatcher(causal, max_batch_size=4, max_wait_ms=0, max_queue=100)
    a, b, c, d, e, f = prompts[0], prompts[6], prompts[2], prompts[5], prompts[-1], prompts[3]
    schedule = [(0, [(a, 3), (b, 12)]), (2, [(c, 9)]), (3, [(d, 20), (e, 5)]), (6, [(f, 8)])]
    family, logits = batcher.family, []
    step_logits = family.logits

    def recorded(*args):
        out = step_logits(*args)
        logits.append(out)
        return out

    family.logits = recorded

    def admitted(rows) -> None:
        assert batcher._cache.n == len(rows)

    try:
        tokens_of, seen, rows = drive(batcher, schedule, logits, on_admit=admitted)
    finally:
        batcher.stop()
    assert rows is None and batcher.stats["joined"] == 4, batcher.stats  # c, d, e, f
    for text, n in [pair for _, group in schedule for pair in group]:
        tokens = tokens_of[text]
        assert tokens == generated(causal, text, n)
        ids = prompt_ids(causal, text)
        full = causal.model(input_ids=torch.tensor([ids + tokens[:-1]])).logits[0]
        torch.testing.assert_close(torch.stack(seen[text]), full[len(ids) - 1:],
                                   atol=1e-4, rtol=1e-4)
    assert len({tuple(tokens) for tokens in tokens_of.values()}) > 3  # a mix-up would show


def test_requests_submitted_while_others_decode_equal_generate(causal, prompts):
    """Through ``submit``, as the server calls it: requests arrive while others decode, with
    their own max_new_tokens, one of three texts; every output equals `Seq2Seq.generate` of its
    text alone, and no request went through ``generate()``."""
    batcher = ContinuousBatcher(causal, max_batch_size=4, max_wait_ms=0, max_queue=100)
    lengths = [8, 2, 5, 12, 1, 3, 8, 4]

    async def main():
        futures = []
        for i, (text, n) in enumerate(zip(prompts, lengths)):
            futures.append(batcher.submit([text], {**GREEDY, "max_new_tokens": n}))
            await asyncio.sleep(0.003 * (i % 3))
        futures.append(batcher.submit(prompts[8:11], {**GREEDY, "max_new_tokens": 6}))
        return [await f for f in futures]

    try:
        results = asyncio.run(main())
    finally:
        batcher.stop()
    assert [r.outputs[0] for r in results[:-1]] == [
        causal.generate(t, max_new_tokens=n) for t, n in zip(prompts, lengths)]
    assert results[-1].outputs == [causal.generate(t, max_new_tokens=6) for t in prompts[8:11]]
    assert batcher.stats["generate_calls"] == 0 and batcher.stats["joined"] > 0, batcher.stats


def test_a_seeded_sampled_request_gives_the_same_tokens_alone_and_in_a_busy_batch(causal,
                                                                                 prompts):
    """Two sampled texts (seeds 7 and 8, one per row) alone, then joining a batch of greedy and
    other sampled rows that is decoding: the same outputs, which differ from greedy's.
    (End-of-sequence is off: every row decodes its max_new_tokens.)"""
    sampled = {**GREEDY, "do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 0.95,
               "seed": 7, "max_new_tokens": 16}

    async def run(busy: bool):
        batcher = ContinuousBatcher(causal, max_batch_size=8, max_wait_ms=0, max_queue=100)
        batcher.eos_ids = set()
        try:
            others = []
            if busy:
                others = [batcher.submit([p], {**GREEDY, "max_new_tokens": 30})
                          for p in prompts[:3]]
                others.append(batcher.submit([prompts[3]], {**sampled, "seed": 99,
                                                            "max_new_tokens": 30}))
                await until(lambda: batcher.stats["steps"] >= 3)
            mine = await batcher.submit(prompts[4:6], sampled)
            for other in others:
                await other
            return mine.outputs, dict(batcher.stats)
        finally:
            batcher.stop()

    (alone, _), (busy, stats) = asyncio.run(run(False)), asyncio.run(run(True))
    assert alone == busy
    assert stats["joined"] >= 2 and stats["largest_batch"] >= 5, stats
    greedy = [causal.generate(p, max_new_tokens=16) for p in prompts[4:6]]
    assert alone != greedy


def test_a_client_that_leaves_mid_stream_frees_its_slot(causal, prompts):
    """A streamed completion whose client closes the connection after a few steps: its row
    leaves the batch at the next step (dropped, never answered) while another row goes on and
    is answered as it is alone. Steps are slowed to 10 ms; end-of-sequence is off."""
    app = create_app(causal, settings=ServeSettings())
    batcher, stats = app.state.batcher, app.state.batcher.stats
    batcher.eos_ids = set()
    step = batcher._step
    batcher._step = lambda rows: time.sleep(0.01) or step(rows)
    other = {"prompt": prompts[1], "max_tokens": 40, "temperature": 0}

    async def main(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            answer = asyncio.ensure_future(client.post("/v1/completions", json=other))
            async with client.stream("POST", "/v1/completions", json={
                    "prompt": prompts[0], "max_tokens": 200, "temperature": 0, "stream": True}):
                await until(lambda: stats["steps"] >= 3)
            # the response is closed here, unread: the client has gone
            await until(lambda: stats["dropped"] == 1)
            return (await answer).json(), stats["row_steps"]

    with ServerThread(app) as server:
        shared, row_steps = asyncio.run(main(server.url))
        alone = httpx.post(server.url + "/v1/completions", json=other, timeout=60).json()
    assert batcher.mode == "continuous" and row_steps < 200 and stats["texts"] == 2, stats
    assert shared["choices"][0]["text"] == alone["choices"][0]["text"]


def test_a_prompt_longer_than_the_context_answers_as_generate_does(causal, prompts):
    """A prompt of more tokens than the model's 64 positions keeps its end; its continuation
    slides a quarter of the context at a time, as `Seq2Seq.generate` does (the same tokens),
    beside a short prompt in the same batch."""
    long = " ".join(p for p in prompts if p) * 3
    assert len(prompt_ids(causal, long)) > 64
    batcher = ContinuousBatcher(causal, max_batch_size=4, max_wait_ms=0, max_queue=100)

    async def main():
        return await batcher.submit([long, prompts[2]], {**GREEDY, "max_new_tokens": 40})

    try:
        result = asyncio.run(main())
    finally:
        batcher.stop()
    assert result.outputs == [causal.generate(t, max_new_tokens=40) for t in (long, prompts[2])]
    assert result.output_tokens[0] > 16  # past its first window (a quarter of the context)


def test_openai_chat_and_completions_of_a_decoder_only_checkpoint(causal, prompts):
    """A checkpoint with a chat template behind a live server, through the ``openai`` client:
    the chat answer continues the rendered conversation as `Seq2Seq.generate` does, streamed
    equal to whole; completions continue their prompts (echo prepends them). All on the
    continuous batcher, never ``generate()``."""
    app = create_app(causal, settings=ServeSettings(model_name="tiny-causal"))
    messages = [{"role": "user", "content": prompts[6]},
                {"role": "assistant", "content": prompts[3]},
                {"role": "user", "content": prompts[5]}]
    ask = dict(model="tiny-causal", messages=messages, max_tokens=24, temperature=0)
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        whole = client.chat.completions.create(**ask)
        chunks = list(client.chat.completions.create(stream=True, **ask))
        completion = client.completions.create(model="tiny-causal", prompt=prompts[:3],
                                               max_tokens=12, temperature=0)
        echoed = client.completions.create(model="tiny-causal", prompt=prompts[4], echo=True,
                                           max_tokens=12, temperature=0)
        streamed_text = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny-causal", prompt=prompts[4], max_tokens=12, temperature=0, stream=True)
            if c.choices)
    rendered = causal.tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=True)
    answer = whole.choices[0].message.content
    assert answer == causal.generate(rendered, max_new_tokens=24)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert [c.text for c in completion.choices] == causal.generate(prompts[:3],
                                                                   max_new_tokens=12)
    continuation = causal.generate(prompts[4], max_new_tokens=12)
    assert echoed.choices[0].text == prompts[4] + continuation == prompts[4] + streamed_text
    stats = app.state.batcher.stats
    assert app.state.batcher.mode == "continuous" and stats["generate_calls"] == 0, stats


def teacher_forced(seq2seq, prompt: str, tokens: list[int]) -> torch.Tensor:
    """The log-softmax (len(tokens), V) of one forward pass over ``prompt`` and ``tokens``, at
    the positions that predict ``tokens``."""
    ids = prompt_ids(seq2seq, prompt)
    with torch.no_grad():
        logits = seq2seq.model(input_ids=torch.tensor([ids + tokens[:-1]])).logits[0]
    return logits[len(ids) - 1:].float().log_softmax(-1)


def test_logprobs_of_greedy_answers_equal_a_teacher_forced_forward_pass(causal, prompts):
    """Through the ``openai`` client: completions with ``logprobs: 3`` (streamed and not) and a
    chat answer with ``logprobs`` and ``top_logprobs: 4``. Each generated token's
    log-probability equals the log-softmax of one forward pass over prompt and answer at that
    token (1e-4); its alternatives are sorted, the likeliest being the token itself (greedy);
    the text offsets add up the tokens' texts. The dynamic batcher refuses logprobs (400)."""
    app = create_app(causal, settings=ServeSettings(model_name="m"))
    prompt, n = prompts[6], 10
    messages = [{"role": "user", "content": prompts[5]}]
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        whole = client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0,
                                          logprobs=3)
        chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=n,
                                                temperature=0, logprobs=3, stream=True))
        chat = client.chat.completions.create(model="m", messages=messages, max_tokens=n,
                                              temperature=0, logprobs=True, top_logprobs=4)
        refused = httpx.post(server.url + "/v1/chat/completions", json={
            "messages": messages, "top_logprobs": 2})
    ids = generated(causal, prompt, n)
    text_of = lambda i: causal.tokenizer.decode([i])  # noqa: E731
    expected = teacher_forced(causal, prompt, ids)
    legacy = whole.choices[0].logprobs
    assert legacy.tokens == [text_of(i) for i in ids]
    torch.testing.assert_close(torch.tensor(legacy.token_logprobs),
                               expected[torch.arange(len(ids)), torch.tensor(ids)],
                               atol=1e-4, rtol=0)
    for token, top in zip(legacy.tokens, legacy.top_logprobs):
        values = list(top.values())
        assert len(top) <= 3 and values == sorted(values, reverse=True)
        assert next(iter(top)) == token
    assert legacy.text_offset == [sum(map(len, legacy.tokens[:i])) for i in range(len(ids))]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == legacy.tokens
    assert [p for lp in streamed for p in lp.token_logprobs] == legacy.token_logprobs
    assert [o for lp in streamed for o in lp.text_offset] == legacy.text_offset

    rendered = causal.tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=True)
    chat_ids = generated(causal, rendered, n)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [text_of(i) for i in chat_ids]
    expected = teacher_forced(causal, rendered, chat_ids)
    for k, (entry, i) in enumerate(zip(content, chat_ids)):
        assert entry.logprob == pytest.approx(expected[k, i].item(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 4 and entry.top_logprobs[0].token == entry.token
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        torch.testing.assert_close(torch.tensor(tops), expected[k].topk(4).values,
                                   atol=1e-4, rtol=0)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"

    dynamic = create_app(causal, settings=ServeSettings(batching="dynamic"))
    with ServerThread(dynamic) as server:
        answer = httpx.post(server.url + "/v1/completions", json={
            "prompt": prompt, "max_tokens": 4, "logprobs": 2})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "logprobs"


def test_a_decoder_only_model_in_a_batcher_process(causal, prompts):
    """``--batcher-process``: the child prefills and decodes (nothing is encoded ahead in the
    server's process), and streamed tokens cross the pipe with their log-probabilities. Greedy
    completions equal `Seq2Seq.generate`'s, streamed or not, with the same log-probabilities."""
    app = create_app(causal, settings=ServeSettings(batcher_process=True, model_name="m"))
    ask = dict(model="m", prompt=prompts[1:3], max_tokens=10, temperature=0, logprobs=1)
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        whole = client.completions.create(**ask)
        texts, scores = {}, {}
        for chunk in client.completions.create(stream=True, **ask):
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                if choice.logprobs:
                    scores.setdefault(choice.index, []).extend(choice.logprobs.token_logprobs)
        stats = dict(app.state.batcher.stats)
    assert [c.text for c in whole.choices] == causal.generate(prompts[1:3], max_new_tokens=10)
    assert [texts[i] for i in range(2)] == [c.text for c in whole.choices]
    assert [scores[i] for i in range(2)] == [c.logprobs.token_logprobs for c in whole.choices]
    assert stats["pre_encoded"] == 0 and stats["generate_calls"] == 0, stats
