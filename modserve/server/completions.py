"""POST /v1/completions: one engine request per prompt (text or token ids), `n` choices
each, answered as text_completion objects with the legacy log-probability shape. With echo
and logprobs the prompt's own tokens are scored too (what lm-eval's loglikelihood reads);
with max_tokens 0 nothing is generated (vLLM decodes one token and drops it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from modserve.engine.base import TokenLogprob
from modserve.server.logprobs import merged
from modserve.server.middleware import outcome
from modserve.server.protocol import CompletionRequest
from modserve.server.responses import Completion, CompletionChoice, CompletionLogprobs
from modserve.server.serving import Delta, Served, Serving, request_id
from modserve.server.streaming import Outputs, event_stream, sse


class CompletionServing(Serving):
    async def create(self, body: CompletionRequest, request: Request):
        arrival = time.perf_counter()
        body.refuse_unsupported()
        rid = request_id(request, "cmpl")
        streams, decisions, prompts = [], [], []
        params = body.sampling_params(max(body.max_tokens, 1), body.logprobs_wanted(), body.prompt_logprobs_wanted())
        try:
            for k, prompt in enumerate(body.prompts()):
                ids, text = self.prompt(prompt)
                decision = self.route(request, body, text, None)
                streams.append(self.submit(f"{rid}-{k}", ids, params, decision, "prompt"))
                decisions.append(decision)
                prompts.append((ids, text))
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams))
            raise
        served = Served("completions", rid, body.model, decisions, streams, body.n, [len(ids) for ids, _ in prompts],
                        arrival, user=body.user)
        outcome(request).language = served.language  # `mixed` when the prompts' languages differ
        if body.stream:
            return await event_stream(self, served, request, lambda outputs: self.chunks(served, outputs, body, prompts))
        await self.collect(request, served)
        choices = [
            self.choice(served, body, prompts, k * body.n + i)
            for k in range(len(prompts)) for i in range(body.n)
        ]
        response = Completion(
            id=rid, model=body.model, system_fingerprint=self.fingerprint(served), choices=choices,
            usage=self.usage(served, generated=body.max_tokens > 0),
        )
        return JSONResponse(response.model_dump(), headers=served.headers())

    def prompt(self, prompt: str | list[int]) -> tuple[list[int], str]:
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"], prompt
        self.engine.check_token_ids(prompt, "prompt")  # before decoding them
        return list(prompt), tokenizer.decode(prompt, skip_special_tokens=True)

    def choice(self, served: Served, body: CompletionRequest, prompts, index: int) -> CompletionChoice:
        k = index // body.n
        echo = self.echo(served, body, prompts, k)
        generated = body.max_tokens > 0
        text = (echo[0] if echo else "") + (served.text(index) if generated else "")
        logprobs = None
        if body.logprobs is not None:
            mine = self.shaped(served, index, served.logprobs.get(index) or []) if generated else None
            logprobs = merged(echo[1], mine) if echo else mine
        return CompletionChoice(
            index=index, text=text, finish_reason=served.finish.get(index) if generated else "length",
            logprobs=logprobs,
            prompt_logprobs=self.logprobs.prompt(served.prompt_logprobs.get(k)) if body.prompt_logprobs is not None else None,
        )

    def echo(self, served: Served, body: CompletionRequest, prompts, k: int) -> tuple[str, CompletionLogprobs | None] | None:
        """The prompt as echoed: its text and, with logprobs, its tokens scored (the first unscored)."""
        if not body.echo:
            return None
        ids, text = prompts[k]
        if body.logprobs is None:
            return text, None
        shaped, end = self.logprobs.completion(served.prompt_logprobs.get(k) or [None] * len(ids), 0, ids)
        for i in range(body.n):
            served.text_offsets[k * body.n + i] = end
        return text, shaped

    def shaped(self, served: Served, index: int, logprobs: list[TokenLogprob]) -> CompletionLogprobs:
        """Text offsets continue across a stream's chunks (and after an echoed prompt)."""
        shaped, served.text_offsets[index] = self.logprobs.completion(logprobs, served.text_offsets.get(index, 0))
        return shaped

    async def chunks(self, served: Served, outputs: Outputs, body: CompletionRequest, prompts) -> AsyncIterator[str]:
        fingerprint = self.fingerprint(served)
        options = body.stream_options
        continuous = bool(options and options.continuous_usage_stats)

        def chunk(choices, usage=None) -> str:
            return sse(Completion(id=served.id, model=served.model, system_fingerprint=fingerprint, choices=choices,
                                  usage=usage).model_dump())

        echoed: set[int] = set()
        async for k, out in outputs:
            deltas = self.account(served, k, out)
            choices = []
            if k not in echoed and body.echo and (body.logprobs is None or k in served.prompt_logprobs):
                echoed.add(k)
                text, shaped = self.echo(served, body, prompts, k)
                choices += [CompletionChoice(index=k * body.n + i, text=text, logprobs=shaped) for i in range(body.n)]
            if body.max_tokens > 0:
                choices += [self.chunk_choice(served, body, delta) for delta in deltas if delta[1] or delta[2] or delta[3]]
            elif any(delta[2] for delta in deltas):
                choices += [CompletionChoice(index=i, text="", finish_reason="length") for i, _, reason, _ in deltas if reason]
            if choices:
                yield chunk(choices, self.usage(served) if continuous else None)
        self.finished(served)
        if options and options.include_usage:
            yield chunk([], self.usage(served, generated=body.max_tokens > 0))

    def chunk_choice(self, served: Served, body: CompletionRequest, delta: Delta) -> CompletionChoice:
        index, text, reason, logprobs = delta
        shaped = self.shaped(served, index, logprobs) if logprobs is not None else None
        prompt = None
        if body.prompt_logprobs is not None and reason is not None:
            prompt = self.logprobs.prompt(served.prompt_logprobs.get(index // body.n))
        return CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=shaped, prompt_logprobs=prompt)
