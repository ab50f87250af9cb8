"""Running the app: ``serve()`` behind ``tformer serve``, and `ServerThread` for tests and
benchmarks (a real uvicorn server on a free loopback port, in a thread)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn
from huggingface_hub import try_to_load_from_cache

from tformer import lora
from tformer.ct2 import is_exported
from tformer.engines import load
from tformer.hub import looks_like_path
from tformer.serving.app import create_app
from tformer.serving.settings import ServeSettings

log = logging.getLogger(__name__)


def require_safetensors(checkpoint: str | Path) -> None:
    """Raise ``FileNotFoundError`` unless the checkpoint's weights are in safetensors files.

    ``tformer.load`` prefers safetensors but reads an old ``pytorch_model.bin`` (with
    ``weights_only=True``); a server refuses it outright. A local directory must hold
    ``*.safetensors`` (a LoRA checkpoint: its adapter's and, in turn, its base model's) or be a
    CTranslate2 export (``tformer export``); a Hub name must have ``model.safetensors`` (or its
    shard index) in the local cache."""
    text = str(checkpoint)
    path = Path(text).expanduser()
    hint = ("tformer serve reads weights only from safetensors: re-save the model with "
            "save_pretrained(..., safe_serialization=True)")
    if path.is_dir():
        if is_exported(path):  # CTranslate2's model.bin is its own flat format, not a pickle
            return
        adapter = path / lora.ADAPTER_DIR
        if not (path / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
            if not (adapter / "adapter_model.safetensors").is_file():
                raise FileNotFoundError(f"{text}: the LoRA adapter has no "
                                        f"adapter_model.safetensors; {hint}")
            require_safetensors(lora.adapter_base(adapter))
            return
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(f"{text}: no safetensors weights (*.safetensors); {hint}")
        return
    if path.exists():
        raise FileNotFoundError(f"checkpoint {text} is a file; give its directory")
    if looks_like_path(text):
        raise FileNotFoundError(f"checkpoint directory {text} does not exist")
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if isinstance(try_to_load_from_cache(text, name), str):
            return
    raise FileNotFoundError(f"{text}: no safetensors weights in the local Hugging Face cache; "
                            f"pass a local directory. {hint}")


def serve(checkpoint: str | Path, settings: ServeSettings, *, device: str | None = None,
          log_level: str = "info", **load_options) -> None:
    """Load ``checkpoint`` with `tformer.load` (``load_options`` passed on) and serve it with
    uvicorn until interrupted. Refuses checkpoints without safetensors weights."""
    require_safetensors(checkpoint)  # passes a CTranslate2 export (its model.bin is no pickle)
    seq2seq = load(checkpoint, device=device, **load_options)
    if not settings.loopback and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address can "
                    "use the model (set --api-key or TFORMER_API_KEY)", settings.host)
    app = create_app(seq2seq, settings=settings)
    log.info("serving %s on http://%s:%d", checkpoint, settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level,
                timeout_graceful_shutdown=5)


class ServerThread:
    """A uvicorn server for ``app`` in a background thread, on a free port of 127.0.0.1::

        with ServerThread(app) as server:
            httpx.get(server.url + "/healthz")
    """

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self.host = host
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run,
                                        kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 300  # a batcher process (settings) takes seconds
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the uvicorn server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self._socket.close()
