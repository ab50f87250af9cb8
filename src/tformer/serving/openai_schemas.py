"""The JSON bodies of the OpenAI-compatible routes (`tformer.serving.openai_api`), as pydantic
models: what OpenAI's API reference names, for the fields this server serves.

Requests are closed, as OpenAI's are (an unknown field is a 400 naming it). Fields that clients
send with a neutral value but that this server does not implement (penalties, ``logit_bias``,
``suffix``, ``best_of``) are accepted at that value only, and the schema says so: anything else
is a 400 naming the field, never silently ignored. ``logprobs`` (and chat's ``top_logprobs``)
are served by the continuous batcher (`tformer.serving.logprobs`). ``top_k`` is an extension (as
in vLLM): the page's top-k, and Hugging Face ``generate()``'s.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from tformer.serving.schemas import MIN_TEMPERATURE, Positive, encodable, integral

#: OpenAI's limit on stop sequences; and the longest one this server takes.
MAX_STOPS, MAX_STOP_CHARS = 4, 256
INT64 = 2**63


def _temperature_schema(schema: dict) -> None:
    """0 (greedy) or [1e-4, 2]: what lies between makes the distribution degenerate."""
    schema.pop("anyOf", None)
    schema["anyOf"] = [{"type": "number", "minimum": MIN_TEMPERATURE, "maximum": 2.0},
                       {"type": "number", "enum": [0]}, {"type": "null"}]


def _integers(*names: str) -> dict:
    """A JSON Schema that holds when every field ``names`` is there as an integer."""
    return {"required": list(names), "properties": {name: {"type": "integer"} for name in names}}


def _completion_rules(schema: dict) -> None:
    """What the server checks across fields, in the schema (clients and fuzzers read it
    there): no ``logprobs`` with ``echo`` (the prompt's tokens are not scored)."""
    schema["not"] = {"required": ["echo", "logprobs"],
                     "properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}}}


def _chat_rules(schema: dict) -> None:
    """As `_completion_rules`: not both ``max_tokens`` and ``max_completion_tokens``;
    ``top_logprobs`` only with ``logprobs: true``."""
    schema["allOf"] = [{"not": _integers("max_tokens", "max_completion_tokens")},
                       {"if": _integers("top_logprobs"),
                        "then": {"required": ["logprobs"],
                                 "properties": {"logprobs": {"const": True}}}}]


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
# Bounds inside the types: on an optional field, Field(ge=...) would not reach the schema's
# non-null branch (as in tformer.serving.schemas).
TopK = Annotated[int, Field(ge=0, le=1_000_000), BeforeValidator(integral)]
Seed = Annotated[int, Field(ge=-INT64, lt=INT64), BeforeValidator(integral)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Zero = Annotated[float, Field(ge=0.0, le=0.0, allow_inf_nan=False)]
Short = Annotated[str, Field(max_length=256)]
Text = Annotated[str, Field(description="at most max_input_chars characters")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(False, description="a last chunk (before [DONE]) with usage "
                                "and no choices")


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the served model's id (GET /v1/models); "
                              "null = that one; another id is a 404")
    max_tokens: Positive | None = Field(
        None, description="longest completion in tokens; default: the server's "
        "default_max_new_tokens; at most max_new_tokens_cap")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, allow_inf_nan=False, json_schema_extra=_temperature_schema,
        description="default 1 (OpenAI's); 0 = greedy; between 0 and 1e-4: 400 (degenerate)")
    top_p: TopP | None = Field(None, description="nucleus sampling; default 1")
    top_k: TopK | None = Field(None, description="extension: sample among the k likeliest; "
                               "0 = off")
    n: Positive = Field(1, description="completions per prompt; prompts x n at most max_inputs")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"up to {MAX_STOPS} sequences: the completion ends before the first "
        "(finish_reason stop)")
    seed: Seed | None = Field(None, description="sampling: the same seed and request give the "
                              "same completions")
    stream: bool = Field(False, description="Server-Sent Events: data: {chunk} lines as tokens "
                         "are decoded, then data: [DONE]")
    stream_options: StreamOptions | None = None
    presence_penalty: Zero | None = Field(None, description="not supported: 0 only")
    frequency_penalty: Zero | None = Field(None, description="not supported: 0 only")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(
        None, description="not supported: empty only")
    user: Short | None = Field(None, description="accepted, not used")

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}: lower "
                             "temperatures overflow")
        return value

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop

    def alternatives(self) -> int | None:
        """How many likeliest tokens to list beside each generated token's log-probability;
        None: no log-probabilities."""
        return None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    model_config = ConfigDict(json_schema_extra=_completion_rules)

    prompt: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="one prompt or several (at most max_inputs); an encoder-decoder model "
        "reads it as its source")
    echo: bool = Field(False, description="prepend the prompt to the completion: decoder-only "
                       "models only (an encoder-decoder model's output does not continue its "
                       "prompt: 400)")
    logprobs: Annotated[int, Field(ge=0, le=5), BeforeValidator(integral)] | None = Field(
        None, description="the log-probability of each generated token (of the model's raw "
        "distribution) and of its this many likeliest alternatives; 400 with echo, and with "
        "the dynamic batcher")
    best_of: Literal[1] | None = Field(None, description="not supported: 1 only")
    suffix: None = Field(None, description="not supported: null only")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            return [encodable(text) for text in value]
        return encodable(value)

    def alternatives(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Short | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        return encodable(value) if isinstance(value, str) else value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: the messages, rendered by the tokenizer's chat template,
    are the prompt."""

    model_config = ConfigDict(json_schema_extra=_chat_rules)

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: Positive | None = Field(None, description="as max_tokens (OpenAI's "
                                                   "newer name); give one of the two")
    logprobs: bool | None = Field(None, description="the log-probability of each generated "
                                  "token (of the model's raw distribution); 400 with the "
                                  "dynamic batcher")
    top_logprobs: Annotated[int, Field(ge=0, le=20), BeforeValidator(integral)] | None = Field(
        None, description="with logprobs: this many likeliest alternatives of each token")

    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses ----------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the model read, each prompt once (n > 1 "
                               "included), counted with the model's tokenizer")
    completion_tokens: int = Field(description="tokens of every completion returned, "
                                   "re-encoded with the model's tokenizer")
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy form: per generated token, its text, log-probability, likeliest
    alternatives ({text: log-probability}, most likely first) and offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the token's text as UTF-8 bytes")


class TokenLogprobs(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the likeliest tokens, most likely first")


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobs] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, server_error")
    param: str | None = Field(description="the request field at fault, if any")
    code: str | None = Field(description="machine-readable, e.g. model_not_found, "
                             "chat_template_missing, input_too_long")


class OpenAIError(BaseModel):
    """OpenAI's error object, for the OpenAI-compatible routes."""

    error: OpenAIErrorBody
