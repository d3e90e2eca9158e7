"""ASGI middleware: the body-size guard and per-request accounting.

`RequestAccounting` counts and times every completion request, whatever answered it (a
413 from `BodyLimit`, a validation 400, a stream). What only the serving code knows (the
language served, a stream that failed after its 200) it writes into the request's
`Outcome`, which the middleware reads once the response is done.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

from fastapi import Request

from modserve.server.errors import ApiError
from modserve.server.metrics import Metrics

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
OUTCOME = "modserve.outcome"  # the ASGI scope key
REQUEST_ID = re.compile(rb"^[\x21-\x7e]{1,128}$")


@dataclass
class AppStatus:
    """What /ready and the shutdown drain need to know about the server as a whole."""

    draining: bool = False  # SIGTERM received: new requests get 503, in-flight ones finish
    start_failed: bool = False
    in_flight: int = 0  # completion requests not yet answered to their last byte


@dataclass
class Outcome:
    language: str = "none"  # refused before routing, unless serving says otherwise
    failed: bool = False  # a stream that ended in an error event after its 200


def outcome(request: Request) -> Outcome:
    """The request's Outcome (a throwaway one outside the completion endpoints)."""
    return request.scope.get(OUTCOME) or Outcome()


class RequestAccounting:
    """modserve_requests_total by endpoint, language and status; request duration to the last byte."""

    def __init__(self, app, metrics: Metrics, status: AppStatus):
        self.app, self.metrics, self.status = app, metrics, status

    async def __call__(self, scope, receive, send):
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        start, response, result = time.perf_counter(), {"status": 500}, Outcome()
        scope[OUTCOME] = result

        async def watch(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            await send(message)

        self.status.in_flight += 1
        try:
            await self.app(scope, receive, watch)
        finally:
            self.status.in_flight -= 1
            code = "500" if result.failed else str(response["status"])
            self.metrics.requests.labels(endpoint, self.metrics.language(result.language), code).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - start)


class RequestIds:
    """Every response says which request it answers: the client's X-Request-Id (printable ASCII,
    at most 128 characters) or one made up here; serving reads it from the request headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id")
        if given is not None and not REQUEST_ID.match(given):
            error = ApiError(400, "X-Request-Id: at most 128 printable ASCII characters", "X-Request-Id", "invalid_value")
            return await error.response()(scope, receive, send)
        rid = given or uuid.uuid4().hex.encode()
        if given is None:
            scope = {**scope, "headers": [*scope["headers"], (b"x-request-id", rid)]}

        async def tag(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, tag)


class BodyLimit:
    """413 for bodies over `server.max_request_bytes`, before any of it is parsed.

    Reads the body (up to the limit) and replays it, so chunked uploads without a
    Content-Length are bounded too.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self.too_large(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        error = ApiError(413, f"request body exceeds server.max_request_bytes ({self.limit} bytes)", None, "request_too_large")
        await error.response()(scope, receive, send)
