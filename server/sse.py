"""The transport under both endpoints: Server-Sent Events and the client's disconnect.

A streamed answer is an `SSEResponse` over an async generator of `data: ...` events (`sse` frames one chunk,
`stream_events` turns the engine's outputs into events and ends the stream with `data: [DONE]`); a plain answer is
awaited through `until_disconnect`, which gives up with `ClientGone` when the client goes away.  Either way a client
that goes away gets its engine requests aborted.  Nothing here knows which endpoint it serves.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from .errors import APIError, from_engine_exception, sse_error


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator.

    Starlette stops iterating when the client disconnects but leaves the async generator suspended until garbage
    collection; closing it here runs the generator's `finally`, which cancels the engine requests right away.
    """

    media_type = "text/event-stream"

    def __init__(self, content, on_close=None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # `on_close` (releasing the admission slots) runs here rather than in the generator's `finally`: a
            # generator that never started has no `finally` to run.
            if self._on_close is not None:
                self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await asyncio.shield(aclose())
                except (asyncio.CancelledError, RuntimeError):
                    pass


async def _wait_disconnect(raw: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (if the client goes away).
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(coro, raw: Request):
    """Await `coro`, or cancel it and raise ClientGone if the client disconnects first."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        watch.cancel()
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise ClientGone()


def sse(obj) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


async def stream_events(run, stream, render, usage) -> AsyncIterator[str]:
    """The engine-output loop shared by both streaming endpoints.

    Each engine output becomes SSE chunks via `render(idx, output, state)`; a request-level error (e.g. a stop
    condition the engine rejects) or an engine failure becomes one error event; the stream ends with the usage
    chunk (when asked and nothing failed) and `[DONE]`.  The engine stream is always closed, which aborts it.
    """
    try:
        async for job_index, out in stream:
            try:
                chunks = [render(*item) for item in run.absorb(job_index, out)]
            except APIError as e:
                yield sse_error(e)
                break
            for chunk in chunks:
                yield chunk
        else:
            if usage is not None:
                yield usage()
    except Exception as e:
        yield sse_error(from_engine_exception(e))
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"
