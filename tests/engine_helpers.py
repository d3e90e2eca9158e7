"""What the engine tests of both backends share: prompts, collection, an observer that records."""

from __future__ import annotations

import asyncio

from modserve.engine.base import GenerationRequest, SamplingParams
from modserve.engine.loading import chat_token_ids


class RecordingObserver:
    def __init__(self):
        self.loads: list[tuple[str, str]] = []
        self.failures: list[str] = []
        self.swaps: list[str] = []
        self.steps: list[tuple[int, int]] = []

    def pack_loaded(self, language, source, seconds):
        self.loads.append((language, source))

    def pack_load_failed(self, language, reason):
        self.failures.append(language)

    def pack_swapped(self, language, seconds):
        self.swaps.append(language)

    def step(self, languages, batch_size):
        self.steps.append((languages, batch_size))


def chat_ids(engine, text: str) -> list[int]:
    return chat_token_ids(engine.tokenizer, [{"role": "user", "content": text}])


async def until(condition, timeout: float = 5.0) -> None:
    """Aborts land asynchronously (between steps, or in another process): wait for them."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def collect(engine, request: GenerationRequest) -> dict:
    """Token ids and text per choice, the finish reasons, and the last usage."""
    tokens, text, reasons, last = {}, {}, {}, None
    async for out in engine.generate(request):
        for c in out.choices:
            tokens.setdefault(c.index, []).extend(c.token_ids)
            text[c.index] = text.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
        last = out
    return {"tokens": tokens, "text": text, "reasons": reasons, "usage": (last.prompt_tokens, last.completion_tokens)}


async def greedy(engine, rid: str, language: str, prompt: list[int], max_tokens: int = 20) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return (await collect(engine, GenerationRequest(rid, prompt, params, language)))["tokens"][0]
