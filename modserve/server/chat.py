"""POST /v1/chat/completions: messages through the resident's chat template, answers as
chat.completion or chat.completion.chunk objects."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from modserve.engine.loading import chat_token_ids
from modserve.server.errors import ApiError
from modserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
)
from modserve.server.serving import Served, Serving
from modserve.server.streaming import Outputs, event_stream, sse


class ChatServing(Serving):
    async def create(self, body: ChatCompletionRequest, request: Request):
        arrival = time.perf_counter()
        body.refuse_unsupported()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        decision = self.route(request, body, None, messages)
        prompt = self.prompt(messages)
        params = body.sampling_params(body.limit(), body.logprobs_wanted())
        stream = self.submit(f"chatcmpl-{uuid.uuid4().hex}", prompt, params, decision, "messages")
        served = Served("chat", body.model, [decision], [stream], body.n, [len(prompt)], arrival)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await event_stream(self, served, request, lambda outputs: self.chunks(served, outputs, usage))
        await self.collect(request, served)
        choices = [
            ChatChoice(
                index=i, message=AssistantMessage(content=served.text(i)),
                finish_reason=served.finish.get(i), logprobs=self.logprobs.chat(served.logprobs.get(i)),
            )
            for i in range(body.n)
        ]
        response = ChatCompletion(id=served.request_id, model=body.model, choices=choices, usage=self.usage(served))
        return JSONResponse(response.model_dump(), headers=served.headers())

    def prompt(self, messages: list[dict]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not tokenizer.chat_template:
            raise ApiError(400, "the resident's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            return chat_token_ids(tokenizer, messages)
        except Exception as err:  # well-formed messages the template cannot render: the client's, not a crash
            raise ApiError(422, f"the chat template rejected these messages: {err}", "messages", "template_error") from None

    async def chunks(self, served: Served, outputs: Outputs, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices, usage=None) -> str:
            return sse(ChatCompletionChunk(id=served.request_id, model=served.model, choices=choices, usage=usage).model_dump())

        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(served.n)])
        async for k, out in outputs:
            choices = [
                ChatChunkChoice(
                    index=i, delta=ChatDelta(content=text), finish_reason=reason, logprobs=self.logprobs.chat(logprobs)
                )
                for i, text, reason, logprobs in self.account(served, k, out) if text or reason or logprobs
            ]
            if choices:
                yield chunk(choices)
        self.finished(served)
        if include_usage:
            yield chunk([], self.usage(served))
