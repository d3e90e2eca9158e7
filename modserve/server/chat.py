"""POST /v1/chat/completions: messages through the resident's chat template, answers as
chat.completion or chat.completion.chunk objects (tool calls too)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from modserve.engine.loading import chat_token_ids
from modserve.server.errors import ApiError
from modserve.server.protocol import ChatCompletionRequest
from modserve.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ToolCallChunk,
)
from modserve.server.serving import Served, Serving, request_id
from modserve.server.streaming import Outputs, event_stream, sse
from modserve.server.tools import ToolPlan, call, tool_plan


class ChatServing(Serving):
    async def create(self, body: ChatCompletionRequest, request: Request):
        arrival = time.perf_counter()
        body.refuse_unsupported()
        rid = request_id(request, "chatcmpl")
        messages = [m.for_template() for m in body.messages]
        decision = self.route(request, body, None, messages)
        prompt = self.prompt(messages)
        tools = tool_plan(body)
        structured = tools.constraint if tools else None
        params = body.sampling_params(body.limit(), body.logprobs_wanted(), structured=structured)
        stream = self.submit(rid, prompt, params, decision, "messages")
        served = Served("chat", rid, body.model, [decision], [stream], body.n, [len(prompt)], arrival,
                        user=body.user or body.safety_identifier)
        if body.stream:
            options = body.stream_options
            return await event_stream(self, served, request, lambda outputs: self.chunks(served, outputs, tools, options))
        await self.collect(request, served)
        choices = [self.choice(served, i, tools) for i in range(body.n)]
        response = ChatCompletion(
            id=served.id, model=body.model, system_fingerprint=self.fingerprint(served), choices=choices,
            usage=self.usage(served), prompt_logprobs=self.logprobs.prompt(served.prompt_logprobs.get(0)),
        )
        return JSONResponse(response.model_dump(), headers=served.headers())

    def choice(self, served: Served, index: int, tools: ToolPlan | None) -> ChatChoice:
        text, reason = served.text(index), served.finish.get(index)
        calls = tools.calls(text) if tools and reason == "stop" else None
        message = AssistantMessage(content=None, tool_calls=calls) if calls else AssistantMessage(content=text)
        return ChatChoice(
            index=index, message=message, finish_reason="tool_calls" if calls else reason,
            logprobs=self.logprobs.chat(served.logprobs.get(index)),
        )

    def prompt(self, messages: list[dict], **template_options) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not tokenizer.chat_template:
            raise ApiError(400, "the resident's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            return chat_token_ids(tokenizer, messages, **template_options)
        except Exception as err:  # well-formed messages the template cannot render: the client's, not a crash
            raise ApiError(422, f"the chat template rejected these messages: {err}", "messages", "template_error") from None

    async def chunks(self, served: Served, outputs: Outputs, tools: ToolPlan | None, options) -> AsyncIterator[str]:
        fingerprint = self.fingerprint(served)
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)

        def chunk(choices, usage=None, prompt_logprobs=None) -> str:
            return sse(ChatCompletionChunk(
                id=served.id, model=served.model, system_fingerprint=fingerprint, choices=choices, usage=usage,
                prompt_logprobs=prompt_logprobs,
            ).model_dump())

        first = [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(served.n)]
        if tools and tools.function is not None:  # the named call is known now; its arguments stream
            first = [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", tool_calls=[
                ToolCallChunk(index=0, id=call(tools.function, "").id, type="function",
                              function={"name": tools.function, "arguments": ""})
            ])) for i in range(served.n)]
        yield chunk(first)
        scored = False
        async for k, out in outputs:
            choices = [
                self.chunk_choice(served, i, text, reason, logprobs, tools)
                for i, text, reason, logprobs in self.account(served, k, out) if text or reason or logprobs
            ]
            prompt_logprobs = None
            if not scored and 0 in served.prompt_logprobs:
                prompt_logprobs, scored = self.logprobs.prompt(served.prompt_logprobs[0]), True
            if choices or prompt_logprobs:
                yield chunk(choices, self.usage(served) if continuous else None, prompt_logprobs)
        self.finished(served)
        if include_usage:
            yield chunk([], self.usage(served))

    def chunk_choice(self, served: Served, index: int, text: str, reason, logprobs, tools: ToolPlan | None) -> ChatChunkChoice:
        shaped = self.logprobs.chat(logprobs)
        if tools is None:
            return ChatChunkChoice(index=index, delta=ChatDelta(content=text), finish_reason=reason, logprobs=shaped)
        if tools.function is not None:  # arguments as they come
            delta = ChatDelta(tool_calls=[ToolCallChunk(index=0, function={"arguments": text})]) if text else ChatDelta()
            return ChatChunkChoice(index=index, delta=delta, finish_reason="tool_calls" if reason == "stop" else reason,
                                   logprobs=shaped)
        if reason is None:  # `required`: the list is parsed whole, at the end
            return ChatChunkChoice(index=index, delta=ChatDelta(), logprobs=shaped)
        calls = tools.calls(served.text(index)) if reason == "stop" else None
        if calls is None:
            return ChatChunkChoice(index=index, delta=ChatDelta(content=served.text(index)), finish_reason=reason, logprobs=shaped)
        deltas = [ToolCallChunk(index=j, id=c.id, type="function", function=c.function.model_dump()) for j, c in enumerate(calls)]
        return ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=deltas), finish_reason="tool_calls", logprobs=shaped)
