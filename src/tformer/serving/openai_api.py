"""The OpenAI-compatible routes, beside tformer's own API: what the ``openai`` client (and the
many tools written against OpenAI's API) call.

- ``GET /v1/models``, ``GET /v1/models/{model}``: the one served model (``--model-name``,
  default the checkpoint directory's name);
- ``POST /v1/completions``: ``prompt`` (one or several) -> ``n`` completions each;
- ``POST /v1/chat/completions``: ``messages``, rendered by the tokenizer's chat template, ->
  ``n`` assistant messages (400 for a model whose tokenizer has no template).

Both generate through the app's batcher, sharing batches with ``/v1/generate``. With
``stream`` they answer with Server-Sent Events, ``data: {chunk}`` as the batcher decodes
tokens (`tformer.serving.batcher.TokenStream`), then ``data: [DONE]``. Token ids become text
with `tformer.serving.text_stream.TextStream`, which also cuts at ``stop`` sequences (a row
whose stop sequence is found is closed: the continuous batcher retires it at its next step).

How a prompt is read depends on the model's family, decided in one place (`model_family`): an
encoder-decoder model reads it as its source and writes a new text (``echo`` is refused: its
output does not continue the prompt); a decoder-only model continues it (``echo`` prepends
it; its answer is not stripped). ``logprobs`` (chat: ``logprobs`` and ``top_logprobs``) come
from the continuous batcher, per token, in OpenAI's forms (`tformer.serving.logprobs`); with
the dynamic batcher they are a 400. Errors take OpenAI's form, ``{"error": {message, type,
param, code}}`` (the app's error handlers render an `ApiError` so on these paths:
`tformer.serving.limits.is_openai_path`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tformer.serving import awaiting, limits
from tformer.serving.batcher import Batcher, BatcherStopped, BatchResult, QueueFull, TokenStream
from tformer.serving.limits import ApiError, TokenCounter
from tformer.serving.logprobs import Scored, chat_logprobs, completion_logprobs
from tformer.serving.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    SamplingFields,
    Usage,
)
from tformer.serving.settings import ServeSettings
from tformer.serving.text_stream import TextStream

log = logging.getLogger(__name__)

SEQ2SEQ, CAUSAL = "seq2seq", "causal"

_ERRORS = {status: {"model": OpenAIError} for status in (400, 401, 404, 413, 415, 503, 504)}
#: A streamed answer, documented beside the JSON one: the schema of each event (as OpenAPI
#: describes a text/event-stream, and schemathesis checks it).
_SSE = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "description": "with stream: one event per chunk (data: {chunk}), then data: [DONE]",
    "properties": {"data": {"type": "string", "description": "a chunk as JSON (a "
                            "text_completion or chat.completion.chunk object, or an error), "
                            "or [DONE]"}}}}}}}


def model_family(seq2seq) -> str:
    """``"seq2seq"`` (the prompt is the source) or ``"causal"`` (the prompt is continued): an
    engine's own ``family`` attribute if it has one, else its model config's
    ``is_encoder_decoder`` (False for a decoder-only model, e.g. ``TformerForCausalLM``).
    Anything that says neither (CTranslate2's translator) is seq2seq."""
    family = getattr(seq2seq, "family", None)
    if family in (SEQ2SEQ, CAUSAL):
        return family
    config = getattr(getattr(seq2seq, "model", None), "config", None)
    return CAUSAL if getattr(config, "is_encoder_decoder", True) is False else SEQ2SEQ


def served_model_name(seq2seq, settings: ServeSettings) -> str:
    """``settings.model_name``, else the checkpoint directory's name (a Hub name as given)."""
    if settings.model_name:
        return settings.model_name
    path = str(getattr(seq2seq, "path", "") or "")
    if not path:
        return "tformer"
    return Path(path).resolve().name if Path(path).exists() else path


def sse(data: Any) -> str:
    """One Server-Sent Event: ``data: <JSON>`` (or ``data: [DONE]``) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


@dataclass
class Plan:
    """A validated request: its texts (each prompt ``n`` times) and how to decode them."""

    prompts: list[str]
    n: int
    options: dict[str, Any]
    stops: list[str]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    echo: bool = False
    texts: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.texts = [p for p in self.prompts for _ in range(self.n)]


class Render:
    """How one route's answers and chunks look (completion or chat). ``text_of``: a token's
    text, for log-probabilities (`tformer.serving.logprobs`)."""

    def __init__(self, chat: bool, model: str, text_of: Callable[[int], str]) -> None:
        self.chat, self.model, self.text_of = chat, model, text_of
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}  # per choice: its text streamed so far, by tokens

    def logprobs(self, index: int, scored: Scored | None) -> dict | None:
        """Choice ``index``'s log-probabilities of ``scored`` tokens, which follow those
        rendered before (a stream's text offsets go on from there); None: not asked."""
        if scored is None:
            return None
        if self.chat:
            return chat_logprobs(scored, self.text_of)
        rendered = completion_logprobs(scored, self.text_of, self.offsets.get(index, 0))
        self.offsets[index] = self.offsets.get(index, 0) + sum(map(len, rendered["tokens"]))
        return rendered

    def head(self, plan: Plan) -> list[dict]:
        """The chunks that open a stream: the role (chat), or the echoed prompts."""
        if self.chat:
            return [self.chunk(i, "", None, role=True) for i in range(len(plan.texts))]
        if plan.echo:
            return [self.chunk(i, text, None) for i, text in enumerate(plan.texts)]
        return []

    def chunk(self, index: int, text: str, reason: str | None, role: bool = False,
              scored: Scored | None = None) -> dict:
        logprobs = self.logprobs(index, scored)
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else (
                {"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"text": text, "index": index, "logprobs": logprobs,
                      "finish_reason": reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat
                else "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage.model_dump()}

    def answer(self, plan: Plan, texts: list[str], reasons: list[str], usage: Usage,
               scored: list[Scored] | None = None) -> Completion | ChatCompletion:
        """``scored``: each choice's tokens with their log-probabilities, if asked for."""
        logprobs = [self.logprobs(i, scored[i] if scored else None) for i in range(len(texts))]
        if self.chat:
            return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage,
                                  choices=[ChatChoice(index=i, message=AssistantMessage(content=t),
                                                      logprobs=lp, finish_reason=r)
                                           for i, (t, r, lp) in enumerate(zip(texts, reasons,
                                                                              logprobs))])
        shown = [p + t for p, t in zip(plan.texts, texts)] if plan.echo else texts
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage,
                          choices=[CompletionChoice(text=t, index=i, logprobs=lp, finish_reason=r)
                                   for i, (t, r, lp) in enumerate(zip(shown, reasons, logprobs))])


def openai_router(seq2seq, settings: ServeSettings, batcher: Batcher, counter: TokenCounter,
                  model_limit: int | None, dependencies: list) -> APIRouter:
    """The routes of this module, for `tformer.serving.app.create_app` to include."""
    family = model_family(seq2seq)
    name = served_model_name(seq2seq, settings)
    path = Path(str(getattr(seq2seq, "path", "") or ""))
    card = ModelCard(id=name, created=int(path.stat().st_mtime if str(path) != "." and
                                          path.exists() else time.time()), owned_by="tformer")
    router = APIRouter(dependencies=dependencies, responses=_ERRORS, tags=["openai"])
    source_cap = limits.source_cap(None, model_limit)

    @router.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        """The served model (one)."""
        return ModelList(data=[card])

    @router.get("/v1/models/{model}", response_model=ModelCard)
    async def model(model: str) -> ModelCard:
        """The served model; 404 for any other id."""
        check_model(model)
        return card

    @router.post("/v1/completions", response_model=Completion, responses=_SSE)
    async def completions(body: CompletionRequest, request: Request):
        """``n`` completions of each prompt: for an encoder-decoder model, its output for the
        prompt as source. With ``stream``, Server-Sent Events as tokens are decoded."""
        check_model(body.model)
        if body.echo and family == SEQ2SEQ:
            raise ApiError(400, "echo_unsupported", "echo is for decoder-only models: an "
                           "encoder-decoder model reads the prompt as its source, and its "
                           "output does not continue it", param="echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "invalid_request", "logprobs with echo would score the prompt's "
                           "tokens too, which this server does not do: leave one out",
                           param="logprobs")
        plan = make_plan(prompts, body, body.max_tokens, "max_tokens", "prompt")
        plan.echo = body.echo
        return await respond(plan, request, Render(False, name, counter.token_text))

    @router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_SSE)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """``n`` assistant messages answering ``messages``, which the tokenizer's chat template
        renders as the prompt (400 when the model has none). With ``stream``, Server-Sent
        Events as tokens are decoded."""
        check_model(body.model)
        if not getattr(counter.tokenizer, "chat_template", None):
            raise ApiError(400, "chat_template_missing", "this model has no chat template (its "
                           "tokenizer's chat_template is not set), so it cannot be chatted "
                           "with: send the text to /v1/completions as a prompt",
                           param="messages")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "invalid_request", "give max_tokens or max_completion_tokens, "
                           "not both", param="max_completion_tokens")
        try:
            prompt = counter.chat_prompt([{"role": m.role, "content": m.text()}
                                          for m in body.messages])
        except Exception as error:  # the template's own check (jinja's raise_exception)
            raise ApiError(400, "chat_template_error", f"the chat template refused these "
                           f"messages: {error}", param="messages") from None
        maximum, param = ((body.max_completion_tokens, "max_completion_tokens")
                          if body.max_completion_tokens is not None else (body.max_tokens,
                                                                          "max_tokens"))
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "invalid_request", "top_logprobs needs logprobs: true",
                           param="top_logprobs")
        plan = make_plan([prompt], body, maximum, param, "messages")  # limits: the prompt
        return await respond(plan, request, Render(True, name, counter.token_text))

    def check_model(asked: str | None) -> None:
        if asked is not None and asked != name:
            raise ApiError(404, "model_not_found", f"the model {asked!r} does not exist: this "
                           f"server serves {name!r} (GET /v1/models)", param="model")

    def make_plan(prompts: list[str], body: SamplingFields, max_tokens: int | None,
                  max_param: str, what: str) -> Plan:
        limits.check_texts(prompts, settings, what)
        if len(prompts) * body.n > settings.max_inputs:
            raise ApiError(413, "too_many_inputs", f"{len(prompts)} prompt(s) x n={body.n} "
                           f"completions; the limit max_inputs is {settings.max_inputs}",
                           limit="max_inputs", value=settings.max_inputs, param="n")
        options = sampling_options(body, max_tokens, max_param, settings, model_limit)
        alternatives = body.alternatives()
        if alternatives is not None:
            if batcher.mode != "continuous":
                raise ApiError(400, "logprobs_unsupported", "log-probabilities come from the "
                               "continuous batcher; this server batches with the "
                               f"{batcher.mode} one", param="logprobs")
            options["logprobs"] = alternatives
        read = limits.check_tokens(counter.count(prompts), source_cap, settings, what)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Plan(prompts, body.n, options, body.stops(), sum(read), body.stream, include_usage)

    async def respond(plan: Plan, request: Request, render: Render):
        """Submit the plan's texts; the answer, whole or as a stream of events."""
        streamed = plan.stream or bool(plan.stops)  # stop sequences are found as tokens come
        try:
            if streamed:
                stream = batcher.stream(plan.texts, plan.options)
            else:
                future = batcher.submit(plan.texts, plan.options)
        except QueueFull as error:
            raise ApiError(503, "queue_full", str(error), limit="max_queue",
                           value=settings.max_queue, headers={"Retry-After": "1"}) from None
        except BatcherStopped as error:
            raise ApiError(503, error.code, str(error)) from None
        rows = [TextStream(counter.decode, plan.stops, counter.byte_tokens, strip=family == SEQ2SEQ)
                for _ in plan.texts]
        if plan.stream:
            return StreamingResponse(events(stream, plan, rows, render),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if streamed:
            future = asyncio.ensure_future(collect(stream, rows))
        result = await awaiting.answer(future, request, settings.timeout_s)
        texts, reasons, usage = finish(plan, result, rows)
        scored = result.logprobs
        if scored and streamed:  # a row cut at a stop sequence: its tokens up to the cut, as
            # streamed (the batcher scored one more, at the step that retired the row)
            scored = [lp[: len(row.tokens)] if row.stopped else lp
                      for lp, row in zip(scored, rows)]
        return render.answer(plan, texts, reasons, usage, scored)

    async def collect(stream: TokenStream, rows: list[TextStream]) -> BatchResult:
        async for tokens in awaiting.events(stream, settings.timeout_s):
            feed(stream, tokens, rows)
        return stream.future.result()

    async def events(stream: TokenStream, plan: Plan, rows: list[TextStream],
                     render: Render) -> AsyncIterator[str]:
        try:
            for chunk in render.head(plan):
                yield sse(chunk)
            async for tokens in awaiting.events(stream, settings.timeout_s):
                for index, text, scored in feed(stream, tokens, rows):
                    yield sse(render.chunk(index, text, None, scored=scored))
            try:
                result = stream.future.result()
            except BatcherStopped as error:
                raise ApiError(503, error.code, str(error)) from None
            before = [row.sent for row in rows]
            _, reasons, usage = finish(plan, result, rows)
            for index, (row, sent) in enumerate(zip(rows, before)):
                yield sse(render.chunk(index, row.sent[len(sent):], reasons[index]))
            if plan.include_usage:
                yield sse(render.usage_chunk(usage))
        except ApiError as error:  # the status line is out: the error goes in the stream
            yield sse(error.openai_body())
        except Exception:  # noqa: BLE001  (the client gets an error event, the log the trace)
            log.exception("a streamed answer failed")
            yield sse(ApiError(500, "internal_error", "internal error (see the server's "
                               "log)").openai_body())
        yield sse("[DONE]")

    def feed(stream: TokenStream, tokens: list[tuple],
             rows: list[TextStream]) -> list[tuple[int, str, Scored | None]]:
        """One push's tokens into their rows' texts: what each row can show now, with the
        tokens' log-probabilities when asked for. A row that reaches a stop sequence is closed
        (its batch slot freed at the next step)."""
        shown = []
        for index, token, *logprob in tokens:  # (index, token[, TokenLogprob])
            row = rows[index]
            if row.stopped:
                continue
            text = row.add(token)
            if row.stopped:
                stream.close(index)
            if text or logprob:
                shown.append((index, text, [(token, logprob[0])] if logprob else None))
        return shown

    def finish(plan: Plan, result: BatchResult,
               rows: list[TextStream]) -> tuple[list[str], list[str], Usage]:
        """Each row's final text (cut at a stop sequence), finish reason, and the usage."""
        for row, output in zip(rows, result.outputs):
            row.finish(output)
        texts = [row.sent for row in rows]
        cut = any(row.stopped for row in rows)  # else the batcher's own counts are the texts'
        counts = (result.output_tokens if result.output_tokens is not None and not cut
                  else counter.count(texts, special=False))
        reasons = [finish_reason(row, result, i, plan.options["max_new_tokens"])
                   for i, row in enumerate(rows)]
        return texts, reasons, Usage(prompt_tokens=plan.prompt_tokens,
                                     completion_tokens=sum(counts),
                                     total_tokens=plan.prompt_tokens + sum(counts))

    def finish_reason(row: TextStream, result: BatchResult, index: int, max_new: int) -> str:
        """"stop" (end of sequence or a stop sequence) or "length" (``max_tokens``). A batcher
        that cannot tell (``generate()``) leaves it to the output's length in tokens."""
        if row.stopped:
            return "stop"
        if result.finish_reasons:
            return result.finish_reasons[index]
        tokens = (result.output_tokens[index] if result.output_tokens is not None
                  else counter.count([result.outputs[index]], special=False)[0])
        return "length" if tokens >= max_new else "stop"

    return router


def sampling_options(body: SamplingFields, max_tokens: int | None, param: str,
                     settings: ServeSettings, model_limit: int | None) -> dict[str, Any]:
    """The batcher's options for an OpenAI request, as `tformer.serving.limits.resolve_options`
    makes them for ``/v1/generate`` (a greedy request's are equal, so they share batches):
    temperature 0 is greedy; by default (temperature 1, OpenAI's) it samples."""
    max_new_tokens = max_tokens or min(settings.default_max_new_tokens,
                                       settings.max_new_tokens_cap)
    if max_new_tokens > settings.max_new_tokens_cap:
        raise ApiError(400, "max_tokens_too_large", f"{param} is {max_new_tokens}; the limit "
                       f"max_new_tokens_cap is {settings.max_new_tokens_cap}",
                       limit="max_new_tokens_cap", value=settings.max_new_tokens_cap,
                       param=param)
    temperature = 1.0 if body.temperature is None else body.temperature
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0,
        do_sample=temperature > 0,
        max_source_length=min(limits.source_cap(None, model_limit) or settings.max_input_tokens,
                              settings.max_input_tokens),
    )
    if temperature > 0:
        options.update(temperature=temperature, top_k=body.top_k or 0,
                       top_p=1.0 if body.top_p is None else body.top_p)
        if body.seed is not None:
            options["seed"] = body.seed
    return options


def state_openai(schema: dict, name: str, family: str) -> dict:
    """What the schema can say of this server's OpenAI routes: the one model id, and (for an
    encoder-decoder model) that ``echo`` is false only."""
    schemas = schema.get("components", {}).get("schemas", {})
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        properties = schemas.get(request, {}).get("properties", {})
        if "model" in properties:
            properties["model"] = {"anyOf": [{"type": "string", "enum": [name]}, {"type": "null"}],
                                   "title": "Model", "description": properties["model"].get(
                                       "description", "")}
        if "echo" in properties and family == SEQ2SEQ:
            properties["echo"]["enum"] = [False]
    return schema

