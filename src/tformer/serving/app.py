"""The app factory: ``create_app(seq2seq, settings=...)`` builds the FastAPI app around a model
that is already loaded. Nothing is loaded at import time, and the app never loads a model.

Routes (all but ``/healthz`` and the page's own files need the API key when one is set):

- ``GET /`` and ``/static/*``: the web page (`tformer/serving/static/`);
- ``GET /healthz``: liveness (the batcher's worker is running);
- ``GET /v1/model``: what is loaded (its family, whether it has a chat template) and the
  limits;
- ``POST /v1/generate``: outputs for inputs, through the batcher (`tformer.serving.batcher`);
- ``POST /v1/attention``: attention maps of one input and its (given or generated) target (a
  decoder-only model: the causal self-attention of the input followed by its continuation);
- ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``: the
  OpenAI-compatible API, with streaming (`tformer.serving.openai_api`);
- ``GET /openapi.json``, ``GET /docs``: the OpenAPI schema and Swagger UI.

Errors are ``{"error": {code, message, ...}}`` JSON; on the OpenAI-compatible routes, OpenAI's
``{"error": {message, type, param, code}}`` (a bad field is then 400, as OpenAI answers it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from importlib import resources

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import tformer
from tformer.generation import max_source_length_of
from tformer.serving import limits
from tformer.serving.awaiting import answer
from tformer.serving.batcher import Batcher, BatcherStopped, QueueFull
from tformer.serving.batching import DynamicBatcher
from tformer.serving.continuous import ContinuousBatcher, supports_continuous
from tformer.serving.limits import ApiError, is_openai_path
from tformer.serving.openai_api import model_family, openai_router, served_model_name, state_openai
from tformer.serving.process import ProcessBatcher
from tformer.serving.schemas import (
    AttentionRequest,
    AttentionResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelInfo,
    Timing,
)
from tformer.serving.security import PAGE_CSP, GuardMiddleware, key_dependency
from tformer.serving.settings import ServeSettings
from tformer.visualization.attention import attention_maps

log = logging.getLogger(__name__)

STATIC_DIR = resources.files("tformer.serving") / "static"

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 415, 422, 503, 504)}


#: The keys of `AttentionMaps.to_json` that ``include`` chooses, and the part each belongs to.
_PART_OF = {"encoder": "encoder", "decoder": "decoder", "cross": "cross",
            "copy_attention": "copy", "p_gen": "copy"}


def make_batcher(seq2seq, settings: ServeSettings) -> Batcher:
    """The batcher ``settings.batching`` asks for; ``auto`` = continuous for tformer's own
    models, encoder-decoder and decoder-only (`tformer.serving.continuous`), dynamic for
    anything else; in a child process of its
    own when ``settings.batcher_process`` (`tformer.serving.process`). The app knows it only
    as a `tformer.serving.batcher.Batcher`."""
    kind = settings.batching
    if kind == "auto":
        kind = "continuous" if supports_continuous(seq2seq) else "dynamic"
    sizes = dict(max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                 max_queue=settings.max_queue)
    if settings.batcher_process:
        return ProcessBatcher(seq2seq, kind=kind, **sizes)
    cls = ContinuousBatcher if kind == "continuous" else DynamicBatcher
    return cls(seq2seq, **sizes)


def create_app(seq2seq, *, settings: ServeSettings | None = None,
               batcher: Batcher | None = None) -> FastAPI:
    """A FastAPI app serving ``seq2seq`` (a `tformer.Seq2Seq`, or any object with the same
    ``generate`` and ``tokenizer``). The batcher (``make_batcher``'s, unless one is given)
    starts with the app and stops when the app shuts down; ``app.state.batcher`` exposes its
    ``stats``."""
    settings = settings or ServeSettings()
    batcher = batcher if batcher is not None else make_batcher(seq2seq, settings)
    settings = dataclasses.replace(settings, batching=batcher.mode)  # auto, resolved
    writable = output_limit(seq2seq)
    if writable is not None and writable < settings.max_new_tokens_cap:
        log.info("max_new_tokens_cap lowered from %d to %d: the model's decoder has a position "
                 "table of %d", settings.max_new_tokens_cap, writable, writable)
        settings = dataclasses.replace(settings, max_new_tokens_cap=writable)
    counter = limits.TokenCounter(getattr(seq2seq, "tokenizer", None))
    model_limit = source_limit(seq2seq)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(batcher.start)  # a batcher process takes seconds to start
        yield
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="tformer", version=tformer.__version__, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None,
                  description="Generation and attention maps from a tformer checkpoint.")
    app.state.batcher, app.state.settings, app.state.seq2seq = batcher, settings, seq2seq
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes)
    _add_error_handlers(app)
    guarded = [Depends(key_dependency(settings.api_key))] if settings.api_key else []
    api = APIRouter(dependencies=guarded, responses=_ERRORS)

    @app.get("/healthz", response_model=Health, tags=["service"],
             responses={503: {"model": ErrorResponse}})
    async def healthz() -> Health:
        """Liveness: answers without a key; 503 when the model's worker has died."""
        if not batcher.healthy:
            raise ApiError(503, "worker_down", "the model's worker (thread or process) is not "
                           "running")
        return Health(status="ok")

    @api.get("/v1/model", response_model=ModelInfo, tags=["model"])
    async def model_info() -> ModelInfo:
        """What is loaded: path, model type, size, device, and the server's limits."""
        return _model_info(seq2seq, settings)

    @api.post("/v1/generate", response_model=GenerateResponse, tags=["model"])
    async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
        """One output per input, in input order, decoded with the given options. Concurrent
        requests with equal options share one batch."""
        arrived = time.monotonic()
        limits.check_texts(body.inputs, settings)
        options = limits.resolve_options(body, settings, model_limit)
        counts = counter.count(body.inputs)
        read = limits.check_tokens(counts, limits.source_cap(body.max_source_length, model_limit),
                                   settings)
        try:
            future = batcher.submit(body.inputs, options)
        except QueueFull as error:
            raise ApiError(503, "queue_full", str(error), limit="max_queue",
                           value=settings.max_queue, headers={"Retry-After": "1"}) from None
        except BatcherStopped as error:
            raise ApiError(503, error.code, str(error)) from None
        result = await answer(future, request, settings.timeout_s)
        return GenerateResponse(
            outputs=result.outputs, input_tokens=read, output_tokens=result.output_tokens,
            truncated_inputs=sum(n > r for n, r in zip(counts, read)),
            batch_inputs=result.batch_inputs,
            timing=Timing(queue_ms=result.queue_ms, generate_ms=result.generate_ms,
                          total_ms=(time.monotonic() - arrived) * 1000.0),
        )

    @api.post("/v1/attention", response_model=AttentionResponse, response_model_exclude_none=True,
              tags=["model"], responses={501: {"model": ErrorResponse}})
    async def attention(body: AttentionRequest, request: Request) -> AttentionResponse:
        """Encoder, decoder and cross-attention maps (per layer, per head) of one input and
        its target, and for a model with copy attention its copy attention and p_gen; without
        a target, of the output generated with the options. A decoder-only model: the causal
        self-attention ("decoder") of the input followed by the target, its continuation. 501
        when the loaded model cannot return attention weights (e.g. another inference
        engine)."""
        if not has_attention(seq2seq):
            raise ApiError(501, "attention_unavailable", f"the loaded model "
                           f"({type(getattr(seq2seq, 'model', seq2seq)).__name__}) has no "
                           "attention maps")
        limits.check_texts([body.input], settings, "input")
        options = limits.resolve_options(body, settings, model_limit)
        counts = counter.count([body.input])
        read = limits.check_tokens(counts, limits.source_cap(body.max_source_length, model_limit),
                                   settings, "input")
        if body.target is not None:
            limits.check_texts([body.target], settings, "target")
            limits.check_tokens(counter.count([body.target]), None, settings, "target")
        started = time.monotonic()
        parts = set(body.include)
        try:
            future = batcher.call(lambda: _attention_json(seq2seq, body.input, body.target, options))
        except BatcherStopped as error:
            raise ApiError(503, error.code, str(error)) from None
        maps = await answer(future, request, settings.timeout_s)
        shown = {k: v for k, v in maps.items() if k not in _PART_OF or _PART_OF[k] in parts}
        return AttentionResponse(**shown, truncated_inputs=int(counts[0] > read[0]),
                                 timing_ms=(time.monotonic() - started) * 1000.0)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs():
        # Swagger UI's script and style come from a CDN: this page needs a network; the
        # schema itself (/openapi.json) does not.
        return get_swagger_ui_html(openapi_url="openapi.json", title="tformer API")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"),
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    app.include_router(api)
    app.include_router(openai_router(seq2seq, settings, batcher, counter, model_limit, guarded))
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    default_openapi = app.openapi

    def openapi_with_limits() -> dict:
        if app.openapi_schema is None:  # built once; FastAPI caches it in openapi_schema
            state_openai(state_limits(default_openapi(), settings),
                         served_model_name(seq2seq, settings), model_family(seq2seq))
        return app.openapi_schema

    app.openapi = openapi_with_limits
    return app


def state_limits(schema: dict, settings: ServeSettings) -> dict:
    """Write the server's caps into its OpenAPI schema (``maximum``, ``maxItems``,
    ``maxLength``) on the request bodies, so that what the schema calls valid is what the server
    accepts (a client or a fuzzer reads them there). Caps with no JSON Schema form: the token
    cap (``max_input_tokens``, 413: a text within ``max_input_chars`` may still hold too many
    tokens), and an OpenAI request's prompts x ``n`` (``max_inputs``, 413)."""
    chars = {"maxLength": settings.max_input_chars}
    texts = {"maxItems": settings.max_inputs, "items": chars}
    tokens = {"integer": {"maximum": settings.max_new_tokens_cap}}
    caps = {  # per property, per JSON type of its (non-null) branches
        "max_new_tokens": tokens, "max_tokens": tokens, "max_completion_tokens": tokens,
        "num_beams": {"integer": {"maximum": settings.max_beams}},
        "n": {"integer": {"maximum": settings.max_inputs}},
        "inputs": {"array": texts}, "prompt": {"string": chars, "array": texts},
        "input": {"string": chars}, "target": {"string": chars}, "content": {"string": chars},
        "text": {"string": chars},
    }
    requests = {"GenerateRequest", "AttentionRequest", "CompletionRequest",
                "ChatCompletionRequest", "ChatMessage", "TextPart"}
    for title, model in schema.get("components", {}).get("schemas", {}).items():
        if title not in requests:
            continue
        for name, prop in model.get("properties", {}).items():
            for branch in prop.get("anyOf", [prop]):
                for key, value in caps.get(name, {}).get(branch.get("type"), {}).items():
                    if isinstance(value, dict):  # "items": the schema of each element
                        branch.setdefault(key, {}).update(value)
                    else:
                        branch[key] = value
    return schema


def has_attention(seq2seq) -> bool:
    """Whether attention maps can be drawn: a PyTorch model (own or Hugging Face, seq2seq or
    decoder-only) and a tokenizer. Other engines (e.g. CTranslate2) do not return attention
    weights."""
    model = getattr(seq2seq, "model", None)
    return isinstance(model, torch.nn.Module) and getattr(seq2seq, "tokenizer", None) is not None


def output_limit(seq2seq) -> int | None:
    """The most tokens the loaded encoder-decoder model can write: its decoder's learned
    position table (tformer's ``positional: learned``, or a Hugging Face model's
    ``max_position_embeddings``). None without one: sinusoidal or relative positions, another
    engine (which clamps by its own), or a decoder-only model (whose window slides). The app
    lowers ``max_new_tokens_cap`` to it, so a longer request is refused naming the field."""
    model = getattr(seq2seq, "model", None)
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not getattr(config, "is_encoder_decoder", False):
        return None
    if hasattr(config, "positional"):  # tformer's own model
        return config.max_positions if config.positional == "learned" else None
    return getattr(config, "max_position_embeddings", None)


def source_limit(seq2seq) -> int | None:
    """The longest source the loaded PyTorch model reads (its checkpoint's limit); None for
    another engine, which truncates by its own."""
    model = getattr(seq2seq, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    return max_source_length_of(model, getattr(seq2seq, "tokenizer", None))


def _attention_json(seq2seq, source: str, target: str | None, options: dict) -> dict:
    """Runs in the batcher's worker: the model is only ever used from that thread. For a
    decoder-only model ``source`` is the prompt and ``max_source_length`` its context
    (`attention_maps`)."""
    options = dict(options)
    max_new_tokens = options.pop("max_new_tokens")
    max_source_length = options.pop("max_source_length")
    try:
        maps = attention_maps(seq2seq, source, target, max_new_tokens=max_new_tokens,
                              max_source_length=max_source_length, **options)
    except ValueError as error:  # the model returned no attention weights
        raise ApiError(501, "attention_unavailable", str(error)) from None
    return maps.to_json()


def _model_info(seq2seq, settings: ServeSettings) -> ModelInfo:
    model = getattr(seq2seq, "model", None)
    config = getattr(model, "config", None)
    first = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    tokenizer = getattr(seq2seq, "tokenizer", None)
    return ModelInfo(
        path=str(getattr(seq2seq, "path", "")),
        model_type=getattr(config, "model_type", None),
        engine=str(getattr(seq2seq, "engine", "torch")),
        model_class=type(model if model is not None else seq2seq).__name__,
        parameters=sum(p.numel() for p in model.parameters()) if first is not None else None,
        device=str(first.device) if first is not None else None,
        dtype=str(first.dtype).removeprefix("torch.") if first is not None else None,
        vocab_size=getattr(config, "vocab_size", None) or (len(tokenizer) if tokenizer else None),
        family=model_family(seq2seq),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        attention=has_attention(seq2seq),
        auth=settings.api_key is not None,
        limits=settings.limits(),
        version=tformer.__version__,
    )


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is ``{"error": {...}}`` JSON; malformed JSON is 400, a body that is not
    JSON 415, a bad field 422 (400 on the OpenAI-compatible routes, in OpenAI's form)."""

    def reply(request: Request, error: ApiError, details: list[dict] | None = None
              ) -> JSONResponse:
        if is_openai_path(request.url.path):
            return JSONResponse(error.openai_body(), status_code=error.openai_status,
                                headers=error.headers)
        body = error.body()
        if details is not None:
            body["error"]["details"] = details
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return reply(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type")}
                   for e in error.errors()]
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and media != "application/json" and not media.endswith("+json"):
            return reply(request, ApiError(415, "unsupported_media_type", f"the body must be "
                                           f"JSON (Content-Type: application/json), not {media}"))
        if any(d["type"] == "json_invalid" for d in details):
            return reply(request, ApiError(400, "invalid_json", "the request body is not valid "
                                           "JSON"), details)
        fields = [".".join(map(str, d["loc"][1:])) for d in details]
        where = "; ".join(f"{name or 'body'}: {d['msg']}" for name, d in zip(fields, details))
        return reply(request, ApiError(422, "invalid_request", where or "invalid request",
                                       param=fields[0] if fields and fields[0] else None),
                     details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return reply(request, ApiError(error.status_code, code, str(error.detail),
                                       headers=error.headers))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return reply(request, ApiError(500, "internal_error", "internal error (see the "
                                       "server's log)"))
