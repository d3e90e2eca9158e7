"""POST /v1/completions: one engine request per prompt (text or token ids), `n` choices
each, answered as text_completion objects with the legacy log-probability shape."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from modserve.engine.base import TokenLogprob
from modserve.server.middleware import outcome
from modserve.server.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from modserve.server.serving import Served, Serving
from modserve.server.streaming import Outputs, event_stream, sse


class CompletionServing(Serving):
    async def create(self, body: CompletionRequest, request: Request):
        arrival = time.perf_counter()
        body.refuse_unsupported()
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams, decisions, lengths, echoes = [], [], [], []
        try:
            for k, prompt in enumerate(body.prompts()):
                ids, text = self.prompt(prompt)
                decision = self.route(request, body, text, None)
                params = body.sampling_params(body.max_tokens, body.logprobs_wanted())
                streams.append(self.submit(f"{request_id}-{k}", ids, params, decision, "prompt"))
                decisions.append(decision)
                lengths.append(len(ids))
                echoes.append(text if body.echo else "")
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams))
            raise
        served = Served("completions", body.model, decisions, streams, body.n, lengths, arrival)
        outcome(request).language = served.language  # `mixed` when the prompts' languages differ
        for k, echo in enumerate(echoes):
            for i in range(body.n):
                served.choices[k * body.n + i] = [echo] if echo else []
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await event_stream(
                self, served, request, lambda outputs: self.chunks(served, outputs, request_id, usage, echoes)
            )
        await self.collect(request, served)
        choices = [
            CompletionChoice(
                index=i, text=served.text(i), finish_reason=served.finish.get(i),
                logprobs=self.shaped_logprobs(served, i, served.logprobs.get(i)),
            )
            for i in range(len(streams) * body.n)
        ]
        response = Completion(id=request_id, model=body.model, choices=choices, usage=self.usage(served))
        return JSONResponse(response.model_dump(), headers=served.headers())

    def prompt(self, prompt: str | list[int]) -> tuple[list[int], str]:
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"], prompt
        self.engine.check_token_ids(prompt, "prompt")  # before decoding them
        return list(prompt), tokenizer.decode(prompt, skip_special_tokens=True)

    def shaped_logprobs(self, served: Served, index: int, logprobs: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        """Text offsets continue across a stream's chunks."""
        if logprobs is None:
            return None
        shaped, served.text_offsets[index] = self.logprobs.completion(logprobs, served.text_offsets.get(index, 0))
        return shaped

    async def chunks(
        self, served: Served, outputs: Outputs, request_id: str, include_usage: bool, echoes: list[str]
    ) -> AsyncIterator[str]:
        def chunk(choices, usage=None) -> str:
            return sse(Completion(id=request_id, model=served.model, choices=choices, usage=usage).model_dump())

        echoed = [CompletionChoice(index=k * served.n + i, text=e) for k, e in enumerate(echoes) if e for i in range(served.n)]
        if echoed:
            yield chunk(echoed)
        async for k, out in outputs:
            choices = [
                CompletionChoice(
                    index=i, text=text, finish_reason=reason, logprobs=self.shaped_logprobs(served, i, logprobs)
                )
                for i, text, reason, logprobs in self.account(served, k, out) if text or reason or logprobs
            ]
            if choices:
                yield chunk(choices)
        self.finished(served)
        if include_usage:
            yield chunk([], self.usage(served))
