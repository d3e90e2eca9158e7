"""What both OpenAI endpoints share: route, submit to the engine, gather outputs, account.

`chat.py` and `completions.py` build prompts and responses on top of this; `streaming.py`
frames SSE. Nothing here touches tensors: the engine takes token ids and returns text deltas.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from modserve.engine.base import (
    Engine,
    EngineError,
    GenerationRequest,
    OutputStream,
    RequestOutput,
    TokenLogprob,
)
from modserve.languages import RESIDENT
from modserve.router import Router, RoutingDecision, UnknownLanguageError
from modserve.server.errors import ApiError, from_engine_error
from modserve.server.logprobs import LogprobShapes
from modserve.server.metrics import Metrics
from modserve.server.middleware import outcome
from modserve.server.responses import Usage

log = logging.getLogger("modserve.server")
MODEL = "modserve"
Delta = tuple[int, str, str | None, list[TokenLogprob] | None]  # choice index, text, finish reason, logprobs


def request_id(request: Request, prefix: str) -> str:
    """`<prefix>-<X-Request-Id>`: the client's id when it named the request (see RequestIds)."""
    return f"{prefix}-{request.headers['x-request-id']}"


@dataclass
class Served:
    """One API request in flight: its engine streams (one per prompt) and what the metrics need."""

    endpoint: str
    id: str  # what the response and the log call it (X-Request-Id when given)
    model: str
    decisions: list[RoutingDecision]
    streams: list[OutputStream]
    n: int
    prompt_lengths: list[int]
    arrival: float
    user: str | None = None
    choices: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    text_offsets: dict[int, int] = field(default_factory=dict)  # completions: where the next token's text starts
    prompt_logprobs: dict[int, list[TokenLogprob | None]] = field(default_factory=dict)  # per prompt
    cached_tokens: dict[int, int] = field(default_factory=dict)
    last_token_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lengths)

    @property
    def prompt_param(self) -> str:
        return "messages" if self.endpoint == "chat" else "prompt"

    @property
    def language(self) -> str:
        languages = {d.language for d in self.decisions}
        return languages.pop() if len(languages) == 1 else "mixed"

    def headers(self) -> dict[str, str]:
        return {
            "X-Modserve-Language": ", ".join(dict.fromkeys(d.language for d in self.decisions)),
            "X-Modserve-Detected": ", ".join(dict.fromkeys(d.header_detected for d in self.decisions)),
        }

    def text(self, index: int) -> str:
        return "".join(self.choices.get(index, []))


class Serving:
    """The base of ChatServing and CompletionServing."""

    def __init__(self, engine: Engine, router: Router, metrics: Metrics, log_prompts: bool = False):
        self.engine, self.router, self.metrics = engine, router, metrics
        self.log_prompts = log_prompts
        self.logprobs = LogprobShapes(engine)

    # --- model ids and routing -----------------------------------------------------------

    def model_ids(self) -> list[str]:
        """What /v1/models lists: automatic routing, and one id per pack."""
        return [MODEL, *(f"{MODEL}:{lang}" for lang in self.engine.languages)]

    def known_models(self) -> list[str]:
        """What requests may name: the listed ids, and the resident alone (the math expert as it is)."""
        return [*self.model_ids(), f"{MODEL}:{RESIDENT}"]

    def fingerprint(self, served: Served) -> str:
        """The weights that answered: one target's fingerprint, or one over several (a multi-prompt
        completion across languages)."""
        prints = sorted({self.engine.fingerprints.get(d.language, "") for d in served.decisions})
        if len(prints) == 1:
            return prints[0]
        return "fp_" + hashlib.sha256("|".join(prints).encode()).hexdigest()[:16]

    def explicit_model(self, model: str) -> str | None:
        """`modserve` -> auto (None); `modserve:sw` -> "sw"; anything else is not ours."""
        if model == MODEL:
            return None
        prefix, sep, language = model.partition(":")
        if prefix == MODEL and sep and language:
            return language
        raise ApiError(404, f"model {model!r} does not exist; use one of {self.model_ids()}", "model", "model_not_found")

    def route(self, request: Request, body, text: str | None, messages: list[dict] | None) -> RoutingDecision:
        explicit = self.explicit_model(body.model)
        try:
            if messages is not None:
                decision = self.router.route_messages(messages, explicit_model=explicit, explicit_language=body.language)
            else:
                decision = self.router.route_prompt(text or "", explicit_model=explicit, explicit_language=body.language)
        except UnknownLanguageError as err:
            status = 404 if err.param == "model" else 400
            raise ApiError(status, str(err), err.param, "model_not_found" if status == 404 else "unknown_language") from None
        if decision.reason not in ("model", "language"):
            self.metrics.detections.labels(self.metrics.detected(decision.detected), decision.language).inc()
            self.metrics.detection_seconds.observe(decision.seconds)
        outcome(request).language = decision.language
        return decision

    def submit(self, request_id: str, prompt: list[int], params, decision: RoutingDecision, prompt_param: str) -> OutputStream:
        if self.log_prompts:
            log.info("%s prompt (%s): %r", request_id, decision.language, self.engine.tokenizer.decode(prompt))
        try:
            return self.engine.generate(GenerationRequest(request_id, prompt, params, decision.language))
        except EngineError as err:
            raise from_engine_error(err, prompt_param) from None

    # --- consuming engine output ---------------------------------------------------------

    async def outputs(self, served: Served) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(stream index, output) from every engine stream of the request, as they come."""
        if len(served.streams) == 1:
            async for out in served.streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, stream: OutputStream) -> None:
            try:
                async for out in stream:
                    await queue.put((k, out))
            except Exception as err:
                await queue.put((k, err))
            await queue.put((k, None))

        tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(served.streams)]
        try:
            pending = len(tasks)
            while pending:
                k, item = await queue.get()
                if item is None:
                    pending -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield k, item
        finally:
            for task in tasks:
                task.cancel()

    def account(self, served: Served, k: int, out: RequestOutput) -> list[Delta]:
        """Record one output of stream k; return its deltas with their choice indices."""
        now = time.perf_counter()
        language = self.metrics.language(served.decisions[k].language)
        new_tokens = sum(len(c.token_ids) for c in out.choices)
        if new_tokens:
            if served.last_token_at is None:
                self.metrics.ttft.labels(language).observe(now - served.arrival)
            else:
                self.metrics.itl.labels(language).observe((now - served.last_token_at) / new_tokens)
            served.last_token_at = now
        served.completion_tokens[k] = out.completion_tokens
        served.cached_tokens[k] = out.cached_tokens
        if out.prompt_logprobs is not None:
            served.prompt_logprobs[k] = out.prompt_logprobs
        deltas = []
        for c in out.choices:
            index = k * served.n + c.index
            served.choices.setdefault(index, []).append(c.text)
            if c.finish_reason:
                served.finish[index] = c.finish_reason
            if c.logprobs is not None:
                served.logprobs.setdefault(index, []).extend(c.logprobs)
            deltas.append((index, c.text, c.finish_reason, c.logprobs))
        return deltas

    def finished(self, served: Served) -> None:
        for k, decision in enumerate(served.decisions):
            language = self.metrics.language(decision.language)
            self.metrics.prompt_tokens.labels(language).inc(served.prompt_lengths[k])
            self.metrics.generation_tokens.labels(language).inc(served.completion_tokens.get(k, 0))
        log.info(
            "%s %s language=%s prompt_tokens=%d completion_tokens=%d%s",
            served.id, served.endpoint, served.language, served.prompt_tokens,
            sum(served.completion_tokens.values()), f" user={served.user!r}" if served.user else "",
        )

    def usage(self, served: Served, generated: bool = True) -> Usage:
        """`generated` false: max_tokens 0, the one token decoded to satisfy the engine is not the client's."""
        completion = sum(served.completion_tokens.values()) if generated else 0
        return Usage.of(served.prompt_tokens, completion, sum(served.cached_tokens.values()))

    async def collect(self, request: Request, served: Served) -> None:
        """Run to the end, unless the client leaves first: then abort at once."""

        async def consume() -> None:
            async for k, out in self.outputs(served):
                self.account(served, k, out)

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            await self.close(served)
        if work.cancelled():
            raise ApiError(499, "client closed the request")
        try:
            work.result()
        except EngineError as err:
            raise from_engine_error(err, served.prompt_param) from None
        self.finished(served)

    async def close(self, served: Served) -> None:
        await asyncio.gather(*(s.aclose() for s in served.streams))


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
