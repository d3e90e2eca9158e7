"""Server-sent events for both endpoints: `data: <chunk>` lines ending in `data: [DONE]`.

The first engine output is awaited before the status line, so a refusal (queue full, pack
unavailable) keeps its status instead of arriving mid-stream. A failure after that ends
the stream with an error event and `[DONE]`, and the request counts as failed. A client
that leaves aborts its engine requests at once (see `EventStream`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from modserve.engine.base import EngineError, RequestOutput
from modserve.server.errors import from_engine_error
from modserve.server.middleware import outcome
from modserve.server.serving import Served, Serving

Outputs = AsyncIterator[tuple[int, RequestOutput]]


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def event_stream(
    serving: Serving, served: Served, request: Request, make_chunks: Callable[[Outputs], AsyncIterator[str]]
) -> StreamingResponse:
    """`make_chunks(outputs)` turns the engine outputs into SSE lines (`sse(...)`)."""
    outputs = serving.outputs(served)
    try:
        first = await outputs.__anext__()
    except StopAsyncIteration:
        first = None
    except EngineError as err:
        await serving.close(served)
        raise from_engine_error(err, served.prompt_param) from None
    except BaseException:
        await serving.close(served)
        raise

    async def replay() -> Outputs:
        if first is not None:
            yield first
        async for item in outputs:
            yield item

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in make_chunks(replay()):
                yield chunk
        except EngineError as err:
            outcome(request).failed = True
            error = from_engine_error(err, served.prompt_param)
            yield sse({"error": {"message": error.message, "type": "server_error", "param": None, "code": error.code}})
        finally:  # also when the client left: the aborts must run even in a cancelled scope
            with anyio.CancelScope(shield=True):
                await serving.close(served)
        yield "data: [DONE]\n\n"

    headers = {**served.headers(), "Cache-Control": "no-cache"}
    return EventStream(body(), media_type="text/event-stream", headers=headers)


class EventStream(StreamingResponse):
    """A StreamingResponse that closes its producer as soon as the response ends, however it
    ends: Starlette leaves a producer cut off mid-send to the garbage collector, and until then
    its engine requests would keep generating for a client that is gone."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
