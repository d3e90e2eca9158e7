"""What the engine tests of both backends share: prompts, collection, an observer that records."""

from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import torch

from modserve.demo.synthetic import EOS_ID, EOT_ID
from modserve.engine.base import GenerationRequest, SamplingParams, StructuredOutput
from modserve.engine.loading import chat_token_ids
from tests.oracle import hf_adjusted_greedy, hf_greedy, hf_logprobs

ANSWER = {  # bounded, so even a random model completes it within a few dozen tokens
    "type": "object",
    "properties": {
        "answer": {"type": "integer", "minimum": 0, "maximum": 999},
        "unit": {"enum": ["apples", "eggs"]},
        "sure": {"type": "boolean"},
    },
    "required": ["answer", "unit", "sure"],
    "additionalProperties": False,
}
END_IDS = {EOS_ID, EOT_ID}  # the tiny families' generation_config eos ids
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # engines run on a GPU where there is one


class RecordingObserver:
    def __init__(self):
        self.loads: list[tuple[str, str]] = []
        self.failures: list[str] = []
        self.swaps: list[str] = []
        self.steps: list[tuple[int, int]] = []
        self.step_failures = 0

    def pack_loaded(self, language, source, seconds):
        self.loads.append((language, source))

    def pack_load_failed(self, language, reason):
        self.failures.append(language)

    def pack_swapped(self, language, seconds):
        self.swaps.append(language)

    def step(self, languages, batch_size):
        self.steps.append((languages, batch_size))

    def step_failed(self):
        self.step_failures += 1


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
    tokens, text, reasons, logprobs, last, scored = {}, {}, {}, {}, None, None
    async for out in engine.generate(request):
        scored = out.prompt_logprobs if out.prompt_logprobs is not None else scored
        for c in out.choices:
            tokens.setdefault(c.index, []).extend(c.token_ids)
            logprobs.setdefault(c.index, []).extend(c.logprobs or [])
            text[c.index] = text.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
        last = out
    return {
        "tokens": tokens, "text": text, "reasons": reasons, "logprobs": logprobs,
        "usage": (last.prompt_tokens, last.completion_tokens), "cached": last.cached_tokens, "prompt_logprobs": scored,
    }


async def greedy(engine, rid: str, language: str, prompt: list[int], max_tokens: int = 20) -> list[int]:
    """Greedy tokens, checked against their own finish reason: `stop` exactly when the last
    token ends the sequence, else `length` after all max_tokens — an engine that stops early fails."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    got = await collect(engine, GenerationRequest(rid, prompt, params, language))
    tokens, reason = got["tokens"][0], got["reasons"][0]
    if tokens and tokens[-1] in END_IDS:
        assert reason == "stop", (rid, tokens, reason)
    else:
        assert reason == "length" and len(tokens) == max_tokens, (rid, tokens, reason)
    return tokens


async def churn(engine, oracle: dict, languages: list[str], seed: int, count: int = 16) -> None:
    """Requests of random languages, lengths and arrival times, a quarter aborted after their
    first token: every one that completes must still equal its merged checkpoint, whatever
    slots, groups and packs were shuffled underneath it."""
    rng = random.Random(seed)
    plans = [
        (f"churn-{seed}-{k}", rng.choice(languages), rng.randrange(10), rng.choice([1, 2, 7, 24]), rng.random() < 0.25, rng.random() * 0.2)
        for k in range(count)
    ]

    async def one(rid: str, language: str, words: int, max_tokens: int, abort: bool, delay: float):
        await asyncio.sleep(delay)
        prompt = chat_ids(engine, f"{rid}: {'word ' * words}in {language}")
        if abort:
            params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
            stream = engine.generate(GenerationRequest(rid, prompt, params, language))
            await stream.__anext__()
            await stream.aclose()
            return None
        return language, prompt, max_tokens, await greedy(engine, rid, language, prompt, max_tokens)

    for done in await asyncio.gather(*(one(*plan) for plan in plans)):
        if done is not None:
            language, prompt, max_tokens, got = done
            assert got == hf_greedy(oracle[language], prompt, max_tokens), (language, prompt)


async def assert_logprobs_are_the_merged_models(engine, oracle: dict, language: str) -> None:
    """Greedy and sampled: each token's log-probability and its top k are transformers'
    log-softmax on the merged checkpoint at that position (raw logits, not the sampling ones)."""
    prompt = chat_ids(engine, f"log-probabilities in {language}")
    for k, params in enumerate([
        SamplingParams(max_tokens=8, temperature=0.0, logprobs=3),
        SamplingParams(max_tokens=8, temperature=0.8, seed=5, logprobs=0, ignore_eos=True),
    ]):
        got = await collect(engine, GenerationRequest(f"logprobs-{language}-{k}", prompt, params, language))
        tokens, logprobs = got["tokens"][0], got["logprobs"][0]
        assert [lp.token_id for lp in logprobs] == tokens
        ref = hf_logprobs(oracle[language], prompt, tokens)
        for step, lp in enumerate(logprobs):
            assert abs(lp.logprob - ref[step, lp.token_id].item()) < 1e-3
            assert len(lp.top) == params.logprobs
            kth = ref[step].topk(params.logprobs).values[-1].item() if params.logprobs else 0.0
            for token, value in lp.top:
                assert abs(value - ref[step, token].item()) < 1e-3 and value >= kth - 1e-3
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        if params.greedy:
            assert all(lp.top[0][0] == lp.token_id for lp in logprobs)


PENALTY_CASES = [
    {"presence_penalty": 2.0},
    {"frequency_penalty": 1.5},
    {"repetition_penalty": 3.0},
    {"logit_bias": ((65, 30.0), (66, -30.0))},
    {"presence_penalty": 0.5, "frequency_penalty": 1.0, "repetition_penalty": 1.5, "logit_bias": ((70, 4.0),)},
]


async def assert_penalties_and_logit_bias_steer_like_the_oracle(engine, oracle: dict, language: str) -> None:
    """Each adjustment changes the greedy tokens, and exactly as the step-by-step oracle says."""
    prompt = chat_ids(engine, "Say it 0 times: again and again")  # every case changes te's and resident's tokens
    plain = hf_adjusted_greedy(oracle[language], prompt, 16)
    for k, case in enumerate(PENALTY_CASES):
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, **case)
        got = (await collect(engine, GenerationRequest(f"penalty-{language}-{k}", prompt, params, language)))["tokens"][0]
        want = hf_adjusted_greedy(oracle[language], prompt, 16, **case)
        assert want != plain, f"{case} does not change this prompt's tokens: pick a stronger case"
        assert got == want, case


async def assert_prompt_logprobs_are_the_merged_models(engine, oracle: dict, language: str) -> None:
    """Every prompt token (but the first, which nothing predicts) scored as transformers scores
    it on the merged checkpoint: its log-probability, its rank, the k likeliest."""
    prompt = chat_ids(engine, f"score this prompt in {language}, " * 3)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2)
    got = await collect(engine, GenerationRequest(f"prompt-logprobs-{language}", prompt, params, language))
    entries = got["prompt_logprobs"]
    assert len(entries) == len(prompt) and entries[0] is None
    ref = hf_logprobs(oracle[language], prompt[:1], prompt[1:])
    for position, entry in enumerate(entries[1:], start=1):
        row = ref[position - 1]
        assert entry.token_id == prompt[position]
        assert abs(entry.logprob - row[entry.token_id].item()) < 1e-3
        assert entry.rank == int((row > row[entry.token_id]).sum()) + 1
        assert [t for t, _ in entry.top] == row.topk(2).indices.tolist()


async def assert_structured_outputs_hold_in_a_mixed_batch(engine, languages: list[str], temperature: float) -> None:
    """Constrained and free rows of every language in the same batches: each constrained choice
    parses and validates against its schema; the free ones stay free."""
    constraint = StructuredOutput("json", json.dumps(ANSWER))
    constrained = SamplingParams(max_tokens=48, temperature=temperature, seed=5, n=2, structured=constraint)
    free = SamplingParams(max_tokens=24, temperature=temperature, seed=5)
    prompt = chat_ids(engine, "how many?")
    runs = [collect(engine, GenerationRequest(f"so-{k}-{lang}", prompt, constrained, lang)) for k, lang in enumerate(languages)]
    runs += [collect(engine, GenerationRequest(f"free-{k}-{lang}", prompt, free, lang)) for k, lang in enumerate(languages)]
    results = await asyncio.gather(*runs)
    for got in results[: len(languages)]:
        for index, text in got["text"].items():
            assert got["reasons"][index] == "stop", text
            jsonschema.validate(json.loads(text), ANSWER)
    assert any(not text.startswith("{") for got in results[len(languages):] for text in got["text"].values())
