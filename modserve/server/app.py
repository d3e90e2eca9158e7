"""The FastAPI app: OpenAI endpoints, health, readiness, metrics, and their guards.

The engine loads in the background after the socket opens, so `/health` answers
during a long model load and `/ready` turns 200 only once requests can be served.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from modserve import __version__
from modserve.config import ServeConfig
from modserve.engine.base import Engine, EngineError
from modserve.router import Router
from modserve.server.chat import ChatServing
from modserve.server.completions import CompletionServing
from modserve.server.errors import ApiError, from_engine_error
from modserve.server.metrics import Metrics
from modserve.server.middleware import AppStatus, BodyLimit, RequestAccounting, RequestIds
from modserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from modserve.server.responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse

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
    status = AppStatus()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.observer = metrics
        metrics.watch(engine)
        loading = asyncio.create_task(engine.start())
        loading.add_done_callback(started)
        try:
            yield
        finally:
            status.draining = True
            if not loading.done():
                loading.cancel()
            await engine.shutdown()

    def started(task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is None:
            log.info("ready: resident loaded, packs %s", ", ".join(engine.languages) or "none")
            return
        status.start_failed = True
        log.error("engine failed to start: %s", task.exception())
        if on_start_failure is not None:
            on_start_failure(task.exception())

    app = FastAPI(title="modserve", version=__version__, lifespan=lifespan)
    app.state.status = status
    app.add_middleware(RequestAccounting, metrics=metrics, status=status)
    app.add_middleware(BodyLimit, limit=int(config.server.max_request_bytes))
    app.add_middleware(RequestIds)
    app.add_middleware(CatchAll)
    created = int(time.time())

    keys = [k.encode() for k in config.server.api_keys]

    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k) for k in keys):
            raise ApiError(401, "missing or invalid API key (send Authorization: Bearer <key>)", None, "invalid_api_key")

    def serving_ready() -> None:
        if status.draining:
            raise ApiError(503, "modserve is shutting down; retry on another replica", None, "draining")
        if not engine.alive:
            raise ApiError(503, "the engine loop died; this server must be restarted", None, "engine_dead")
        if status.start_failed:
            raise ApiError(503, "the engine failed to start (the server log has the reason)", None, "start_failed")
        if not engine.ready:
            raise ApiError(503, "modserve is not ready: the resident model is still loading", None, "not_ready")

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
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first['msg']}", None, "invalid_json").response()
        param = param_of(first["loc"])
        return ApiError(400, f"{param or 'body'}: {first['msg']}", param, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        """Starlette's own: unknown routes, wrong methods, bodies it cannot parse."""
        codes = {404: "unknown_route", 405: "method_not_allowed", 400: "invalid_body"}
        messages = {
            404: f"no route {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
            400: "the body could not be parsed (send UTF-8 JSON)",
        }
        error = ApiError(err.status_code, messages.get(err.status_code, str(err.detail)), None, codes.get(err.status_code))
        return error.response(headers=dict(err.headers or {}))

    @app.get("/health")
    async def health():
        """Liveness: the process is up and its engine loop alive (a dead loop never recovers)."""
        if not engine.alive:
            raise ApiError(503, "the engine loop died; restart this server", None, "engine_dead")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        serving_ready()
        return {"status": "ready", "languages": engine.languages}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def card(model_id: str) -> ModelCard:
        return ModelCard(id=model_id, created=created, root=model_id, max_model_len=engine.max_model_len)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return ModelList(data=[card(model_id) for model_id in chat.model_ids()]).model_dump()

    def known_model(model_id: str | None) -> None:
        if model_id is not None and model_id not in chat.known_models():
            raise ApiError(404, f"model {model_id!r} does not exist; use one of {chat.known_models()}", "model", "model_not_found")

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        known_model(model_id)
        return card(model_id).model_dump()

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest):
        """vLLM's: a prompt, or chat messages through the served template, as token ids."""
        known_model(body.model)
        tokenizer = engine.tokenizer
        if isinstance(body, TokenizeChatRequest):
            messages = [m.for_template() for m in body.messages]
            tokens = chat.prompt(messages, add_generation_prompt=body.add_generation_prompt,
                                 continue_final_message=body.continue_final_message)
        else:
            tokens = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens, token_strs=strs).model_dump()

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest):
        known_model(body.model)
        engine.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens)).model_dump()

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        return await completion.create(body, request)

    return app


PYDANTIC_TAGS = re.compile(r"^(str|int|float|bool|dict|list|none|function-.*|.*[\[(].*)$", re.I)


def param_of(loc: tuple) -> str | None:
    """The field a validation error is about, as OpenAI names it (`messages.0.content`), without
    pydantic's union-branch tags (`prompt.str` -> `prompt`)."""
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or not PYDANTIC_TAGS.match(str(p))]
    return ".".join(parts) or None


class CatchAll:
    """Any exception no handler took becomes an OpenAI-shaped 500 (logged, not shown), and the
    connection stays open: Starlette's own last resort re-raises, and the server then drops it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            if not started:
                error = ApiError(500, "internal error (the server log has the details)", None, "internal_error")
                await error.response()(scope, receive, send)
