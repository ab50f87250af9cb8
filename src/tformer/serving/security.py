"""The server's guards: the API key, the request body size, and headers on every response.

The key is accepted as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` and compared in
constant time (`hmac.compare_digest` over SHA-256 digests, so not even the key's length shows
in the timing). The body guard is a plain ASGI middleware that reads at most
``max_body_bytes`` before the app sees anything: uvicorn itself has no body limit."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from tformer.serving.limits import ApiError, is_openai_path

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer API_KEY")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: API_KEY")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def key_dependency(api_key: str) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that answers 401 unless the request carries ``api_key``."""
    expected = _digest(api_key)

    async def require_api_key(
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        header: Annotated[str | None, Security(_header)],
    ) -> None:
        given = header if header is not None else (bearer.credentials if bearer else None)
        if given is None or not hmac.compare_digest(_digest(given), expected):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send "
                           "'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                           headers={"WWW-Authenticate": "Bearer"})

    return require_api_key


#: Sent with every response.
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

#: The web page runs only its own files: no CDN, no inline script, no framing.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


class GuardMiddleware:
    """Refuses request bodies over ``max_body_bytes`` with 413 (by Content-Length, or while
    reading a chunked body), then replays the body to the app; adds `SECURITY_HEADERS`.

    An exception that escapes the app is answered here, as a JSON 500, and not raised further:
    Starlette's outermost error middleware would re-raise it after answering, and uvicorn then
    drops the keep-alive connection (the client's next request saw "connection reset")."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(scope, send_with_headers)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await self._too_large(scope, send_with_headers)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        started = False

        async def send_tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send_with_headers(message)

        try:
            await self.app(scope, replay, send_tracked)
        except Exception:  # noqa: BLE001  (anything: the client gets JSON, the log the trace)
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # half an answer is out: nothing else can be sent on it
                return
            body = _render(scope, ApiError(500, "internal_error", "internal error (see the "
                                           "server's log)"))
            await send_with_headers({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]})
            await send_with_headers({"type": "http.response.body", "body": body})

    async def _too_large(self, scope, send) -> None:
        body = _render(scope, ApiError(
            413, "body_too_large", f"the request body exceeds max_body_bytes "
            f"({self.max_body_bytes})", limit="max_body_bytes", value=self.max_body_bytes,
        ))
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _render(scope, error: ApiError) -> bytes:
    """The error's JSON body, in OpenAI's form on the OpenAI-compatible routes."""
    body = error.openai_body() if is_openai_path(scope.get("path", "")) else error.body()
    return json.dumps(body).encode()
