"""Waiting for a batcher on behalf of an HTTP request: a timeout (504), and a client that
leaves (its job is dropped: the batcher skips a cancelled future, and the continuous batcher
retires its rows at the next step)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from tformer.serving.batcher import BatcherStopped, TokenStream
from tformer.serving.limits import ApiError


async def answer(future: asyncio.Future, request: Request, timeout_s: float):
    """The future's result; 504 after ``timeout_s``. A client that disconnects first has its
    future cancelled (the batcher then skips it) and gets no answer."""
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        future.cancel()
        raise
    finally:
        gone.cancel()
    if future in done:
        try:
            return future.result()
        except BatcherStopped as error:
            raise ApiError(503, error.code, str(error)) from None
    future.cancel()
    if gone in done:
        raise ApiError(499, "client_closed", "the client disconnected")
    raise timed_out(timeout_s)


async def events(stream: TokenStream, timeout_s: float) -> AsyncIterator[list[tuple[int, int]]]:
    """The stream's pushes until its job is done, within ``timeout_s`` in all (then 504, and
    the job is dropped). A client that leaves is noticed by the response around it (Starlette
    cancels a streaming response whose client is gone), which cancels the job."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pushes = stream.events()
    try:
        while True:
            try:
                tokens = await asyncio.wait_for(anext(pushes), deadline - loop.time())
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:  # (TimeoutError from Python 3.11 on)
                raise timed_out(timeout_s) from None
            yield tokens
    finally:
        if not stream.future.done():
            stream.cancel()
        await pushes.aclose()


def timed_out(timeout_s: float) -> ApiError:
    return ApiError(504, "timeout", f"no answer within timeout_s ({timeout_s:g} s)",
                    limit="timeout_s", value=timeout_s)


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then, so the next ASGI
    message can only be ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
