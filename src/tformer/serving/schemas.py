"""The JSON bodies of the HTTP API, as pydantic models (they also make the OpenAPI schema).

Requests are strict (``"4"`` is not a number) and closed (an unknown option is a 422, never
silently ignored). An integer field takes an integral float (``0.0``), as JSON Schema counts it
an integer. Sampling options that make the distribution degenerate (a temperature under
`MIN_TEMPERATURE`: the logits overflow to inf and sampling fails) are a 422 naming the field.
Caps that depend on the server's settings (``max_new_tokens``, ``num_beams``, input sizes) are
checked in `tformer.serving.limits`, so their errors can name the setting."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

Part = Literal["encoder", "decoder", "cross", "copy"]

#: The lowest sampling temperature: below it, logits / temperature overflow (1e-300: inf).
MIN_TEMPERATURE = 1e-4


def integral(value):
    """An integral float (``2.0``) as the integer it is; anything else is left to the strict
    integer check (``2.5``, ``true`` and ``"2"`` stay errors)."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(integral)]
# The bound inside the type: on an optional field, Field(ge=1) would reach the schema as a
# "ge" keyword that JSON Schema does not know (pydantic 2.14), not as "minimum".
Positive = Annotated[int, Field(ge=1), BeforeValidator(integral)]


def encodable(text: str) -> str:
    """Refuse lone surrogates (valid in a JSON string, not in UTF-8): no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode at position {error.start}") from None
    return text


class GenerationOptions(BaseModel):
    """Options of `tformer.Seq2Seq.generate`; the defaults are greedy decoding."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: Positive | None = Field(
        None, description="longest output in tokens; default: the server's "
        "default_max_new_tokens; at most max_new_tokens_cap (else 422)")
    num_beams: Integer = Field(1, ge=1, description="1 = greedy; at most max_beams (else 422)")
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0, allow_inf_nan=False)
    no_repeat_ngram_size: Integer = Field(0, ge=0, le=1000, description="0 = off")
    do_sample: bool = Field(False, description="sample instead of greedy/beam search")
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=100.0, allow_inf_nan=False,
                               description="sampling only; at least 1e-4 (lower overflows)")
    top_k: Integer = Field(0, ge=0, le=1_000_000, description="sampling only; 0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="sampling only")
    max_source_length: Positive | None = Field(None, description="truncate inputs to this "
                                          "many tokens (the server's max_input_tokens at most)")


class GenerateRequest(GenerationOptions):
    """``POST /v1/generate``: one output per input, in input order."""

    inputs: list[str] = Field(min_length=1, description="texts; at most max_inputs, each at "
                              "most max_input_chars characters and max_input_tokens tokens")

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, value: list[str]) -> list[str]:
        return [encodable(text) for text in value]


class Timing(BaseModel):
    queue_ms: float = Field(description="from arrival until the model started on it")
    generate_ms: float = Field(description="the generate() call that produced it")
    total_ms: float = Field(description="from arrival to answer")


class GenerateResponse(BaseModel):
    outputs: list[str]
    input_tokens: list[int] = Field(description="tokens the model read, per input")
    truncated_inputs: int = Field(0, description="inputs longer than the model's source limit "
                                  "(or the request's max_source_length), truncated to it")
    output_tokens: list[int] | None = Field(
        description="tokens of each output, re-encoded without special tokens (None when the "
        "model has no tokenizer)")
    batch_inputs: int = Field(description="texts decoded together with this request's (its "
                              "generate() call; with continuous batching, the most texts that "
                              "shared one of its steps); > its own when batched with others")
    timing: Timing


class AttentionRequest(GenerationOptions):
    """``POST /v1/attention``: attention maps of one input and its target, or of the model's
    own output (generated with the options) when ``target`` is null."""

    input: str
    target: str | None = Field(None, description="teacher-forced target; null = generate it")
    include: list[Part] = Field(["encoder", "decoder", "cross", "copy"], min_length=1,
                                description='which maps to return; "copy": copy_attention and '
                                "p_gen, for a model with copy attention (absent otherwise)")

    @field_validator("input", "target")
    @classmethod
    def _check_text(cls, value: str | None) -> str | None:
        return value if value is None else encodable(value)


Maps = list[list[list[list[float]]]]  # (layers, H, Tq, Tk)


class AttentionResponse(BaseModel):
    """The maps as `tformer.visualization.AttentionMaps.to_json` writes them (weights rounded
    to 4 decimals), less the kinds not asked for."""

    source_tokens: list[str]
    target_tokens: list[str] = Field(description="the token predicted at each decoder position")
    decoder_input_tokens: list[str] = Field(
        [], description="the token read at each decoder position (start token, target shifted)")
    layers: int
    heads: int
    counts: dict[str, dict[str, int]] | None = Field(
        None, description='{kind: {"layers", "heads"}} for the three kinds')
    encoder: Maps | None = Field(None, description="per layer (H, S, S)")
    decoder: Maps | None = Field(None, description="per layer (H, T, T)")
    cross: Maps | None = Field(None, description="per layer (H, T, S): row t = target token t "
                               "attending over the source tokens")
    copy_attention: list[list[float]] | None = Field(
        None, description="(T, S) copy attention, for a model with copy attention: row t = "
        "where target token t would be copied from")
    p_gen: list[float] | None = Field(
        None, description="(T,) probability that target token t is generated, not copied "
        "(with copy attention)")
    truncated_inputs: int = Field(0, description="1 when the input was longer than the model's "
                                  "source limit and its maps are of the first tokens only")
    timing_ms: float


class ModelInfo(BaseModel):
    path: str
    model_type: str | None
    engine: str = Field(description='generation engine: "torch" (Hugging Face generate()) or '
                        '"ctranslate2"')
    model_class: str = Field(description="class of the loaded model")
    parameters: int | None
    device: str | None
    dtype: str | None
    vocab_size: int | None
    attention: bool = Field(description="whether /v1/attention can answer")
    auth: bool = Field(description="whether an API key is required")
    limits: dict[str, bool | int | float | str] = Field(
        description="the server's settings: limits, batching (continuous or dynamic), and "
        "whether the batcher runs in a process of its own")
    version: str


class Health(BaseModel):
    status: Literal["ok"]


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable, e.g. input_too_long, unauthorized")
    message: str
    limit: str | None = Field(None, description="the setting that was exceeded, if any")
    value: int | float | None = Field(None, description="that setting's value")
    details: list[dict] | None = Field(None, description="validation errors, if any")


class ErrorResponse(BaseModel):
    error: ErrorBody
