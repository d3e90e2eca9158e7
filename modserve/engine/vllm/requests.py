"""One request in the vLLM backend, from its queue to its last output.

Each choice runs in vLLM as a sequence of its own (a greedy request's identical choices as
one), so a choice can be preempted at the end of a language slice and resumed later as
prompt + what it already generated: the cache salt of its pack lets vLLM's prefix cache
serve that KV again. Text is modserve's own (`TextStream`, the same as the native
backend's): the same tokens give the same text, across a resumption too.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from modserve.engine.base import (
    ChoiceDelta,
    EngineError,
    FinishReason,
    GenerationRequest,
    OutputStream,
    RequestOutput,
    TokenLogprob,
)
from modserve.engine.text import TextStream
from modserve.engine.vllm.conversion import FINISH_REASONS, vllm_logprobs


def submission_id(language: str, request_id: str, choice: int, submission: int) -> str:
    """vLLM's id for one submission of a choice. The language leads, so `pack_mode: grouped`
    can tell each row's pack from vLLM's batch alone (`request_language`)."""
    return f"{language}:{request_id}-{choice}-{submission}"


def request_language(vllm_id: str) -> str:
    """The language at the head of a `submission_id`."""
    return vllm_id.partition(":")[0]


@dataclass
class ChoiceRun:
    """One sequence in vLLM: a choice of the request, or all n choices of a greedy one."""

    indices: tuple[int, ...]  # the choices it answers
    text: TextStream
    seed: int | None
    tokens: list[int] = field(default_factory=list)  # generated so far, over every submission
    finish_reason: FinishReason | None = None
    task: asyncio.Task | None = None
    submissions: int = 0
    submitted_with: int = 0  # tokens it had generated when last submitted

    @property
    def started(self) -> bool:
        """Past its (re)submission's prefill: it produced a token since. Stopping it before
        would throw that prefill away."""
        return len(self.tokens) > self.submitted_with


@dataclass
class VllmRequest:
    request: GenerationRequest
    stream: OutputStream
    runs: list[ChoiceRun]
    salt: str | None  # vLLM cache_salt of the pack that serves it
    stop_ids: frozenset[int]  # EOS (unless ignore_eos) and the request's stop_token_ids
    max_tokens: int  # resolved against the context length
    arrival: float = field(default_factory=time.monotonic)
    waiting_since: float = 0.0  # set by the language groups
    cached_tokens: int = 0  # prompt tokens vLLM served from its prefix cache (first submission)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_posted: bool = False

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def language(self) -> str:
        return self.request.language

    @property
    def unfinished(self) -> list[ChoiceRun]:
        return [run for run in self.runs if run.finish_reason is None]

    @property
    def tasks(self) -> list[asyncio.Task]:
        return [run.task for run in self.runs if run.task is not None and not run.task.done()]

    @property
    def started(self) -> bool:
        return all(run.started for run in self.unfinished)

    @property
    def resumable(self) -> bool:
        """Can it be stopped and resumed as prompt + generated tokens with the same result?
        Not when vLLM would count the generated tokens differently once they are prompt
        (presence/frequency penalties), nor a seeded draw (its random stream would restart),
        nor a structured output (its grammar would start over)."""
        p = self.request.params
        exact = not (p.presence_penalty or p.frequency_penalty) and p.structured is None
        return exact and (p.greedy or p.seed is None)

    def advance(self, run: ChoiceRun, completion) -> list[ChoiceDelta]:
        """vLLM's new tokens, one by one, through the same decisions the native backend makes.
        `max_tokens` already stops it at the context length (the engine refused a longer ask)."""
        if completion.finish_reason == "error":
            raise EngineError("vLLM failed the request (internal error); retry")
        k = self.request.params.logprobs
        logprobs = vllm_logprobs(completion.token_ids, completion.logprobs or (), k) if k is not None else None
        text, tokens = "", []
        for token in completion.token_ids:
            run.tokens.append(token)
            tokens.append(token)
            length_reached = len(run.tokens) >= self.max_tokens
            may_stop = len(run.tokens) >= self.request.params.min_tokens
            released, reason = run.text.advance(token, self.stop_ids if may_stop else frozenset(), length_reached, may_stop)
            text += released
            if reason is not None:
                run.finish_reason = reason
                break
        else:
            if completion.finish_reason is not None and completion.finish_reason != "abort":
                text += run.text.finish()  # vLLM ended it (e.g. an EOS it knows)
                run.finish_reason = FINISH_REASONS.get(completion.finish_reason, "stop")
        chosen = None if logprobs is None else logprobs[: len(tokens)]
        return [ChoiceDelta(i, text, list(tokens), run.finish_reason, chosen) for i in run.indices]

    def output(self, choices: list[ChoiceDelta]) -> RequestOutput:
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_posted:
            prompt_logprobs, self.prompt_logprobs_posted = self.prompt_logprobs, True
        return RequestOutput(
            request_id=self.id,
            choices=choices,
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=sum(len(run.tokens) * len(run.indices) for run in self.runs),
            finished=not self.unfinished,
            cached_tokens=self.cached_tokens,
            prompt_logprobs=prompt_logprobs,
        )

    def aborted(self) -> RequestOutput:
        choices = [ChoiceDelta(i, "", [], "abort") for run in self.unfinished for i in run.indices]
        for run in self.unfinished:
            run.finish_reason = "abort"
        return self.output(choices)
