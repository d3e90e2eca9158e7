"""From an OpenAI request to engine requests and back: route, tokenize, stream, account.

Nothing here touches tensors: the engine takes token ids and returns text deltas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from modserve.engine.base import (
    Engine,
    EngineError,
    GenerationRequest,
    OutputStream,
    RequestOutput,
    TokenLogprob,
)
from modserve.engine.loading import chat_token_ids
from modserve.router import Router, RoutingDecision, UnknownLanguageError
from modserve.server.errors import ApiError, from_engine_error
from modserve.server.logprobs import LogprobShapes
from modserve.server.metrics import Metrics
from modserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)

log = logging.getLogger("modserve.server")
MODEL = "modserve"


@dataclass
class Served:
    """One API request in flight: its engine streams and what the metrics need."""

    endpoint: str
    model: str
    decisions: list[RoutingDecision]
    streams: list[OutputStream]
    n: int
    prompt_lengths: list[int]
    arrival: float
    choices: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    text_offsets: dict[int, int] = field(default_factory=dict)  # completions: where the next token starts
    last_token_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lengths)

    @property
    def language(self) -> str:
        languages = {d.language for d in self.decisions}
        return languages.pop() if len(languages) == 1 else "mixed"

    def headers(self) -> dict[str, str]:
        return {
            "X-Modserve-Language": ", ".join(dict.fromkeys(d.language for d in self.decisions)),
            "X-Modserve-Detected": ", ".join(dict.fromkeys(d.header_detected for d in self.decisions)),
        }


class Serving:
    def __init__(self, engine: Engine, router: Router, metrics: Metrics, log_prompts: bool = False):
        self.engine, self.router, self.metrics = engine, router, metrics
        self.log_prompts = log_prompts
        self.logprobs = LogprobShapes(engine)

    # --- model ids and routing -----------------------------------------------------------

    def model_ids(self) -> list[str]:
        return [MODEL, *(f"{MODEL}:{lang}" for lang in self.engine.languages)]

    def explicit_model(self, model: str) -> str | None:
        """`modserve` -> auto (None); `modserve:sw` -> "sw"; anything else is not ours."""
        if model == MODEL:
            return None
        prefix, sep, language = model.partition(":")
        if prefix == MODEL and sep and language:
            return language
        raise ApiError(404, f"model {model!r} does not exist; use one of {self.model_ids()}", "model", "model_not_found")

    def route(self, body, text: str | None, messages: list[dict] | None) -> RoutingDecision:
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
        return decision

    # --- endpoints -------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request):
        arrival = time.perf_counter()
        body.refuse_unsupported()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        decision = self.route(body, None, messages)
        request.state.language = decision.language
        prompt = self.chat_prompt(messages)
        params = body.sampling_params(body.limit(), body.logprobs_wanted())
        stream = self.submit(f"chatcmpl-{uuid.uuid4().hex}", prompt, params, decision, "messages")
        served = Served("chat", body.model, [decision], [stream], body.n, [len(prompt)], arrival)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self.respond_stream(served, lambda outputs: self.chat_chunks(served, outputs, usage))
        await self.collect(request, served)
        choices = [
            ChatChoice(
                index=i, message=AssistantMessage(content="".join(served.choices.get(i, []))),
                finish_reason=served.finish.get(i), logprobs=self.logprobs.chat(served.logprobs.get(i)),
            )
            for i in range(body.n)
        ]
        response = ChatCompletion(id=stream.request_id, model=body.model, choices=choices, usage=self.usage(served))
        return JSONResponse(response.model_dump(), headers=served.headers())

    async def completion(self, body: CompletionRequest, request: Request):
        arrival = time.perf_counter()
        body.refuse_unsupported()
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams, decisions, lengths, echoes = [], [], [], []
        try:
            for k, prompt in enumerate(body.prompts()):
                ids, text = self.completion_prompt(prompt)
                decision = self.route(body, text, None)
                request.state.language = decision.language
                params = body.sampling_params(body.max_tokens, body.logprobs_wanted())
                streams.append(self.submit(f"{request_id}-{k}", ids, params, decision, "prompt"))
                decisions.append(decision)
                lengths.append(len(ids))
                echoes.append(text if body.echo else "")
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams))
            raise
        served = Served("completions", body.model, decisions, streams, body.n, lengths, arrival)
        request.state.language = served.language
        for k, echo in enumerate(echoes):
            for i in range(body.n):
                served.choices[k * body.n + i] = [echo] if echo else []
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self.respond_stream(
                served, lambda outputs: self.completion_chunks(served, outputs, request_id, usage, echoes)
            )
        await self.collect(request, served)
        choices = [
            CompletionChoice(
                index=i, text="".join(served.choices.get(i, [])), finish_reason=served.finish.get(i),
                logprobs=self.completion_logprobs(served, i, served.logprobs.get(i)),
            )
            for i in range(len(streams) * body.n)
        ]
        response = Completion(id=request_id, model=body.model, choices=choices, usage=self.usage(served))
        return JSONResponse(response.model_dump(), headers=served.headers())

    # --- prompts ---------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not tokenizer.chat_template:
            raise ApiError(400, "the resident's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            return chat_token_ids(tokenizer, messages)
        except Exception as err:  # template errors are the client's messages, not a crash
            raise ApiError(400, f"the chat template rejected these messages: {err}", "messages") from None

    def completion_prompt(self, prompt: str | list[int]) -> tuple[list[int], str]:
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"], prompt
        return list(prompt), tokenizer.decode(prompt, skip_special_tokens=True)

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

    def account(
        self, served: Served, k: int, out: RequestOutput
    ) -> list[tuple[int, str, str | None, list[TokenLogprob] | None]]:
        """Record one output; return (choice index, text, finish reason, logprobs) per delta."""
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

    def completion_logprobs(self, served: Served, index: int, logprobs: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        """Text offsets continue across a stream's chunks."""
        if logprobs is None:
            return None
        shaped, served.text_offsets[index] = self.logprobs.completion(logprobs, served.text_offsets.get(index, 0))
        return shaped

    def finished(self, served: Served) -> None:
        for k, decision in enumerate(served.decisions):
            language = self.metrics.language(decision.language)
            self.metrics.prompt_tokens.labels(language).inc(served.prompt_lengths[k])
            self.metrics.generation_tokens.labels(language).inc(served.completion_tokens.get(k, 0))
        log.info(
            "%s %s language=%s prompt_tokens=%d completion_tokens=%d",
            served.streams[0].request_id, served.endpoint, served.language,
            served.prompt_tokens, sum(served.completion_tokens.values()),
        )

    def usage(self, served: Served) -> Usage:
        return Usage.of(served.prompt_tokens, sum(served.completion_tokens.values()))

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
            raise from_engine_error(err, self.prompt_param(served)) from None
        self.finished(served)

    async def close(self, served: Served) -> None:
        await asyncio.gather(*(s.aclose() for s in served.streams))

    def prompt_param(self, served: Served) -> str:
        return "messages" if served.endpoint == "chat" else "prompt"

    async def respond_stream(self, served: Served, make_chunks) -> StreamingResponse:
        """SSE. The first engine output is awaited before the status line, so a refusal
        (queue full, pack unavailable) keeps its status instead of arriving mid-stream."""
        outputs = self.outputs(served)
        try:
            first = await outputs.__anext__()
        except StopAsyncIteration:
            first = None
        except EngineError as err:
            await self.close(served)
            raise from_engine_error(err, self.prompt_param(served)) from None
        except BaseException:
            await self.close(served)
            raise

        async def replay() -> AsyncIterator[tuple[int, RequestOutput]]:
            if first is not None:
                yield first
            async for item in outputs:
                yield item

        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in make_chunks(replay()):
                    yield chunk
            except EngineError as err:
                error = from_engine_error(err, self.prompt_param(served))
                yield sse({"error": {"message": error.message, "type": "server_error", "code": error.code}})
            finally:  # also on client disconnect: Starlette cancels this generator
                await self.close(served)
            yield "data: [DONE]\n\n"

        headers = {**served.headers(), "Cache-Control": "no-cache"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    async def chat_chunks(self, served: Served, outputs, include_usage: bool) -> AsyncIterator[str]:
        request_id = served.streams[0].request_id

        def chunk(choices, usage=None) -> str:
            return sse(ChatCompletionChunk(id=request_id, model=served.model, choices=choices, usage=usage).model_dump())

        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(served.n)])
        async for k, out in outputs:
            deltas = self.account(served, k, out)
            choices = [
                ChatChunkChoice(
                    index=i, delta=ChatDelta(content=text), finish_reason=reason, logprobs=self.logprobs.chat(logprobs)
                )
                for i, text, reason, logprobs in deltas if text or reason or logprobs
            ]
            if choices:
                yield chunk(choices)
        self.finished(served)
        if include_usage:
            yield chunk([], self.usage(served))

    async def completion_chunks(self, served: Served, outputs, request_id: str, include_usage: bool, echoes: list[str]) -> AsyncIterator[str]:
        def chunk(choices, usage=None) -> str:
            return sse(Completion(id=request_id, model=served.model, choices=choices, usage=usage).model_dump())

        echoed = [CompletionChoice(index=k * served.n + i, text=e) for k, e in enumerate(echoes) if e for i in range(served.n)]
        if echoed:
            yield chunk(echoed)
        async for k, out in outputs:
            deltas = self.account(served, k, out)
            choices = [
                CompletionChoice(
                    index=i, text=text, finish_reason=reason, logprobs=self.completion_logprobs(served, i, logprobs)
                )
                for i, text, reason, logprobs in deltas if text or reason or logprobs
            ]
            if choices:
                yield chunk(choices)
        self.finished(served)
        if include_usage:
            yield chunk([], self.usage(served))


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

