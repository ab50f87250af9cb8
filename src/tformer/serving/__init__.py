"""Serving a model over HTTP: an app factory, batchers behind one protocol (`batcher.Batcher`:
dynamic, continuous, or either in a process of its own), limits, and a web page.

    import tformer
    from tformer.serving import ServeSettings, create_app

    app = create_app(tformer.load("runs/demo/checkpoints/step-0000614"),
                     settings=ServeSettings(max_batch_size=16))

``tformer serve CHECKPOINT`` does the same and runs it with uvicorn. See docs/serving.md.

The names below are imported on first use, so the CLI can read `ServeSettings`' defaults
without importing FastAPI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ServeSettings": "tformer.serving.settings",
    "resolve_api_key": "tformer.serving.settings",
    "create_app": "tformer.serving.app",
    "ServerThread": "tformer.serving.server",
    "require_safetensors": "tformer.serving.server",
    "serve": "tformer.serving.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tformer.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
