"""What a server may be asked for: bind address, API key, batching and the limits on requests.

One frozen dataclass, validated when built (an error names the field), shared by the app
factory, the batcher and the ``tformer serve`` verb."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass

#: Batching modes (see ``ServeSettings.batching``).
BATCHING = ("auto", "continuous", "dynamic")

#: Environment variable read for the API key when ``--api-key`` is not given.
API_KEY_ENV = "TFORMER_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    """Settings of one server. Limits are per request unless said otherwise.

    Attributes:
        host, port: where uvicorn binds; loopback unless told otherwise.
        api_key: required on every route but ``/healthz`` and the web page's own files when
            set (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``); None = no key.
        batching: ``continuous`` (requests join and leave the running batch at every decoding
            step: `tformer.serving.continuous`; greedy requests to tformer's own model),
            ``dynamic`` (one ``generate()`` per batch of requests that arrived together:
            `tformer.serving.batching`), or ``auto`` (continuous where it applies).
        batcher_process: run the batcher (and its copy of the model) in a child process of
            its own, so that decoding does not share one interpreter lock with the HTTP side
            (`tformer.serving.process`); attention maps still run in the server's process.
        max_batch_size: most texts decoded together.
        max_wait_ms: how long a dynamic batch, once it has a request, waits for more (unless
            full); a continuous batch takes requests at every step and never waits.
        max_queue: most texts waiting for the model (with ``batcher_process``: sent to its
            process and not answered yet, decoding included); more is answered 503.
        max_inputs: most texts in one request (413).
        max_input_chars: longest text, in characters (413).
        max_input_tokens: longest text, in tokens after ``max_source_length`` truncation (413).
        max_new_tokens_cap: largest ``max_new_tokens`` a request may ask for (422).
        default_max_new_tokens: ``max_new_tokens`` of a request that does not say (at most
            ``max_new_tokens_cap``).
        max_beams: largest ``num_beams`` (422).
        timeout_s: seconds a request may wait for its answer, queue included (504).
        model_name: the model's id on the OpenAI-compatible routes (``GET /v1/models``, the
            ``model`` field); None = the checkpoint directory's name.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    batching: str = "auto"
    batcher_process: bool = False
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_inputs: int = 32
    max_input_chars: int = 4000
    max_input_tokens: int = 512
    max_new_tokens_cap: int = 256
    default_max_new_tokens: int = 64
    max_beams: int = 8
    timeout_s: float = 60.0
    model_name: str | None = None

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "max_queue", "max_inputs", "max_input_chars",
                    "max_input_tokens", "max_new_tokens_cap", "default_max_new_tokens",
                    "max_beams")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got "
                             f"{self.batching!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ValueError(f"max_wait_ms must be in 0..10000, got {self.max_wait_ms}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_queue < self.max_inputs:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_inputs "
                             f"({self.max_inputs}): a full request would never fit")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (omit it to serve without a key)")
        if self.model_name is not None and not self.model_name.strip():
            raise ValueError("model_name must not be empty (omit it for the checkpoint's name)")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body read: every input at its longest, each character escaped in
        JSON (``\\ud83d\\ude00`` is 12 bytes for one character), plus room for the options."""
        return self.max_inputs * self.max_input_chars * 12 + 65_536

    @property
    def loopback(self) -> bool:
        """True when ``host`` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def limits(self) -> dict:
        """The limits a client should know (shown by ``GET /v1/model``); never the key."""
        shown = asdict(self)
        for name in ("host", "port", "api_key", "model_name"):
            shown.pop(name)
        return shown


def resolve_api_key(flag: str | None) -> str | None:
    """The key given on the command line, else ``$TFORMER_API_KEY``, else None (no key).
    An empty environment variable counts as unset."""
    if flag is not None:
        return flag
    return os.environ.get(API_KEY_ENV) or None
