"""The JSON bodies of the OpenAI-compatible routes (`tformer.serving.openai_api`), as pydantic
models: what OpenAI's API reference names, for the fields this server serves.

Requests are closed, as OpenAI's are (an unknown field is a 400 naming it). Fields that clients
send with a neutral value but that this server does not implement (penalties, ``logit_bias``,
``logprobs``, ``suffix``, ``best_of``) are accepted at that value only, and the schema says so:
anything else is a 400 naming the field, never silently ignored. ``top_k`` is an extension (as
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


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="one prompt or several (at most max_inputs); an encoder-decoder model "
        "reads it as its source")
    echo: bool = Field(False, description="prepend the prompt to the completion: decoder-only "
                       "models only (an encoder-decoder model's output does not continue its "
                       "prompt: 400)")
    logprobs: None = Field(None, description="not supported: null only")
    best_of: Literal[1] | None = Field(None, description="not supported: 1 only")
    suffix: None = Field(None, description="not supported: null only")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            return [encodable(text) for text in value]
        return encodable(value)


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

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: Positive | None = Field(None, description="as max_tokens (OpenAI's "
                                                   "newer name); give one of the two")
    logprobs: Literal[False] | None = Field(None, description="not supported: false only")
    top_logprobs: Literal[0] | None = Field(None, description="not supported: 0 only")


# -- responses ----------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the model read, each prompt once (n > 1 "
                               "included), counted with the model's tokenizer")
    completion_tokens: int = Field(description="tokens of every completion returned, "
                                   "re-encoded with the model's tokenizer")
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
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


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
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
