"""The FastAPI app: OpenAI endpoints, health, readiness, metrics, and their guards.

The engine loads in the background after the socket opens, so `/health` answers
during a long model load and `/ready` turns 200 only once requests can be served.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modserve import __version__
from modserve.config import ServeConfig
from modserve.engine.base import Engine, EngineError
from modserve.router import Router
from modserve.server.chat import ChatServing
from modserve.server.completions import CompletionServing
from modserve.server.errors import ApiError, from_engine_error
from modserve.server.metrics import Metrics
from modserve.server.middleware import BodyLimit, RequestAccounting
from modserve.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

log = logging.getLogger("modserve.server")


def create_app(
    config: ServeConfig,
    engine: Engine,
    router: Router,
    on_start_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    metrics = Metrics(engine.languages)
    chat = ChatServing(engine, router, metrics, config.server.log_prompts)
    completion = CompletionServing(engine, router, metrics, config.server.log_prompts)
    status = {"draining": False, "error": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.observer = metrics
        metrics.watch(engine)
        loading = asyncio.create_task(engine.start())
        loading.add_done_callback(started)
        try:
            yield
        finally:
            status["draining"] = True
            if not loading.done():
                loading.cancel()
            await engine.shutdown()

    def started(task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is None:
            log.info("ready: resident loaded, packs %s", ", ".join(engine.languages) or "none")
            return
        status["error"] = task.exception()
        log.error("engine failed to start: %s", task.exception())
        if on_start_failure is not None:
            on_start_failure(task.exception())

    app = FastAPI(title="modserve", version=__version__, lifespan=lifespan)
    app.add_middleware(RequestAccounting, metrics=metrics)
    app.add_middleware(BodyLimit, limit=int(config.server.max_request_bytes))

    keys = [k.encode() for k in config.server.api_keys]

    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k) for k in keys):
            raise ApiError(401, "missing or invalid API key (send Authorization: Bearer <key>)", None, "invalid_api_key")

    def serving_ready() -> None:
        if not engine.ready or status["draining"]:
            raise ApiError(503, "modserve is not ready: the resident model is loading or the server is draining", None, "not_ready")

    guarded = [Depends(authorize), Depends(serving_ready)]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, err: EngineError):
        prompt_param = "messages" if request.url.path.endswith("chat/completions") else "prompt"
        return from_engine_error(err, prompt_param).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first["loc"] if p != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first['msg']}", None, "invalid_json").response()
        param = ".".join(loc) or None
        return ApiError(400, f"{param or 'body'}: {first['msg']}", param, "invalid_value").response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, f"internal error: {type(err).__name__}", None, "internal_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if status["error"] is not None:
            raise ApiError(503, f"the engine failed to start: {status['error']}", None, "start_failed")
        serving_ready()
        return {"status": "ready", "languages": engine.languages}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        cards = [ModelCard(id=model_id, root=model_id) for model_id in chat.model_ids()]
        return ModelList(data=cards).model_dump()

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        return await completion.create(body, request)

    return app
