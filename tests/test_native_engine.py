"""The native engine serves every language exactly like its merged checkpoint, mixed or alone."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch

from modserve.engine.base import (
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    PackUnavailableError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)
from modserve.engine.native.engine import NativeEngine, NativeEngineConfig
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.merge import merge_pack
from modserve.packs.plan import Plan
from tests.engine_helpers import (
    DEVICES,
    RecordingObserver,
    assert_logprobs_are_the_merged_models,
    assert_penalties_and_logit_bias_steer_like_the_oracle,
    assert_prompt_logprobs_are_the_merged_models,
    assert_structured_outputs_hold_in_a_mixed_batch,
    chat_ids,
    churn,
    collect,
    greedy,
    until,
)
from tests.oracle import hf_greedy, hf_logprobs, stop_string_in

LANGUAGES = ["sw", "te", "bn", "ja", "resident"]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


async def started(resident, packs, **kwargs) -> NativeEngine:
    observer = kwargs.pop("observer", None)
    config = {"device": "cpu", "dtype": "float32", "max_model_len": 512, **kwargs}
    engine = NativeEngine(NativeEngineConfig(resident=resident, packs=packs, **config))
    if observer is not None:
        engine.observer = observer
    await engine.start()
    return engine


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
async def engine(demo, device):
    engine = await started(demo.resident, demo.packs, device=device)
    yield engine
    await engine.shutdown()


def one_pack_budget(demo) -> int:
    """Device memory for one demo pack (fp32) and not two."""
    return int(max((pack / "blocks.safetensors").stat().st_size for pack in demo.packs.values()) * 1.5)


@pytest.mark.parametrize("language", LANGUAGES)
async def test_each_language_alone_equals_transformers_on_its_merge(engine, merged, language):
    prompt = chat_ids(engine, f"Swali: 12 + 7 = ? ({language})")
    assert await greedy(engine, "r", language, prompt) == hf_greedy(merged[language], prompt, 20)


async def test_mixed_batch_with_requests_joining_mid_flight_equals_merges(engine, merged):
    prompts = {
        (lang, k): chat_ids(engine, f"{k} question {'long ' * (3 * k)}in {lang}")
        for k, lang in enumerate(LANGUAGES * 2)
    }
    first = [greedy(engine, f"a{i}", lang, p, 30) for i, ((lang, _), p) in enumerate(list(prompts.items())[:5])]
    early = [asyncio.ensure_future(c) for c in first]
    while not engine.scheduler.running:  # the first wave is decoding when the second arrives
        await asyncio.sleep(0.001)
    late = [greedy(engine, f"b{i}", lang, p, 12) for i, ((lang, _), p) in enumerate(list(prompts.items())[5:])]
    results = await asyncio.gather(*early, *late)
    for k, (((lang, _), prompt), got) in enumerate(zip(prompts.items(), results, strict=True)):
        assert got == hf_greedy(merged[lang], prompt, 30 if k < 5 else 12), (lang, k)


async def test_a_request_joining_after_another_left_takes_a_free_slot(engine, merged):
    prompts = [chat_ids(engine, f"question {k} {'long ' * (4 * k)}") for k in range(4)]
    short = asyncio.ensure_future(greedy(engine, "short", "sw", prompts[0], 2))
    running = [asyncio.ensure_future(greedy(engine, f"r{i}", lang, prompts[i + 1], 40)) for i, lang in enumerate(["sw", "te"])]
    await short  # its slot, below the others', is now a hole
    assert await greedy(engine, "late", "te", prompts[3], 10) == hf_greedy(merged["te"], prompts[3], 10)
    for lang, prompt, got in zip(["sw", "te"], prompts[1:3], await asyncio.gather(*running), strict=True):
        assert got == hf_greedy(merged[lang], prompt, 40)


@pytest.mark.parametrize("seed,max_prefill_tokens", [(0, 8192), (1, 8192), (2, 16), (3, 16)])
async def test_requests_arriving_leaving_and_aborting_at_random_all_equal_their_merges(
    demo, merged, device, seed, max_prefill_tokens
):
    engine = await started(  # full batches, so requests wait too; 16: prompts prefill in chunks
        demo.resident, demo.packs, device=device, max_batch_size=6, max_prefill_tokens=max_prefill_tokens
    )
    try:
        await churn(engine, merged, LANGUAGES, seed)
        await until(lambda: engine.stats().running == 0)
        assert engine.stats().kv_tokens_used == 0 and engine.stats().waiting == 0
    finally:
        await engine.shutdown()


async def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(demo, merged):
    engine = await started(demo.resident, demo.packs, max_prefill_tokens=16)
    try:
        params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        short = chat_ids(engine, "short")
        stream = engine.generate(GenerationRequest("short", short, params, "sw"))
        first = await stream.__anext__()
        long_prompt = chat_ids(engine, "a long question, " * 20)
        long = asyncio.ensure_future(greedy(engine, "long", "te", long_prompt, 8))
        decoded = len(first.choices[0].token_ids)
        while not long.done():
            decoded += sum(len(c.token_ids) for c in (await stream.__anext__()).choices)
        assert decoded > len(long_prompt) // 16  # one decode step for every chunk of the prompt
        assert await long == hf_greedy(merged["te"], long_prompt, 8)
        await stream.aclose()
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("language", ["te", "resident"])
async def test_logprobs_are_the_merged_models_log_probabilities(engine, merged, language):
    await assert_logprobs_are_the_merged_models(engine, merged, language)


@pytest.mark.parametrize("language", ["te", "resident"])
async def test_prompt_logprobs_are_the_merged_models_log_probabilities(engine, merged, language):
    await assert_prompt_logprobs_are_the_merged_models(engine, merged, language)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_structured_outputs_hold_for_every_row_of_a_mixed_language_batch(engine, temperature):
    await assert_structured_outputs_hold_in_a_mixed_batch(engine, LANGUAGES, temperature)


async def test_a_prompt_scored_across_prefill_chunks_is_scored_like_one_prefilled_whole(demo, merged):
    engine = await started(demo.resident, demo.packs, max_prefill_tokens=16)
    try:
        await assert_prompt_logprobs_are_the_merged_models(engine, merged, "sw")
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("language", ["te", "resident"])
async def test_penalties_and_logit_bias_steer_greedy_tokens_like_the_oracle(engine, merged, language):
    await assert_penalties_and_logit_bias_steer_like_the_oracle(engine, merged, language)


async def test_one_decode_step_holds_several_languages(demo):
    observer = RecordingObserver()
    engine = await started(demo.resident, demo.packs, observer=observer)
    try:
        prompt = chat_ids(engine, "hello")
        await asyncio.gather(*[greedy(engine, lang, lang, prompt, 16) for lang in LANGUAGES])
    finally:
        await engine.shutdown()
    assert max(langs for langs, _ in observer.steps) == len(LANGUAGES)


async def test_abort_frees_the_cache_slot_and_the_pack(demo, merged, device):
    engine = await started(demo.resident, demo.packs, device=device, pack_memory=one_pack_budget(demo))
    try:
        prompt = chat_ids(engine, "long answer please")
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        stream = engine.generate(GenerationRequest("long", prompt, params, "sw"))
        await stream.__anext__()
        assert engine.stats().running == 1
        await stream.aclose()  # the client went away
        await until(lambda: engine.stats().running == 0)
        assert engine.stats().kv_tokens_used == 0
        # te fits only where sw was: it serves only if the aborted request let go of sw
        assert await greedy(engine, "next", "te", prompt, 5) == hf_greedy(merged["te"], prompt, 5)
        assert engine.stats().packs_by_tier["device"] == 1
    finally:
        await engine.shutdown()


async def test_pool_budget_evicts_and_reloads_with_identical_results(demo, merged, device):
    observer = RecordingObserver()
    budget = one_pack_budget(demo)
    engine = await started(
        demo.resident, demo.packs, device=device, observer=observer, pack_memory=budget, host_pack_memory=budget
    )
    try:
        prompt = chat_ids(engine, "budget")
        for lang in ["sw", "te", "sw", "bn", "ja", "te"]:
            assert await greedy(engine, lang, lang, prompt, 8) == hf_greedy(merged[lang], prompt, 8)
            tiers, _ = engine.pool.stats()
            assert tiers["device"] <= 1 and tiers["host"] <= 1
        mixed = await asyncio.gather(*[greedy(engine, f"m{lang}", lang, prompt, 8) for lang in LANGUAGES])
        assert mixed == [hf_greedy(merged[lang], prompt, 8) for lang in LANGUAGES]
    finally:
        await engine.shutdown()
    sources = {source for _, source in observer.loads}
    assert sources == {"disk", "host"}  # spilled packs came back from host memory
    assert ("sw", "host") in observer.loads


async def test_corrupted_pack_is_refused_and_other_languages_keep_serving(demo, merged, tmp_path, caplog):
    packs = {}
    for lang, pack in demo.packs.items():
        packs[lang] = shutil.copytree(pack, tmp_path / pack.name)
    blob = bytearray((packs["te"] / "blocks.safetensors").read_bytes())
    blob[-64] ^= 0x10
    (packs["te"] / "blocks.safetensors").write_bytes(bytes(blob))
    observer = RecordingObserver()
    engine = await started(demo.resident, packs, observer=observer)
    try:
        prompt = chat_ids(engine, "corrupt")
        with pytest.raises(PackUnavailableError) as refused:
            await greedy(engine, "bad", "te", prompt)
        assert str(tmp_path) not in str(refused.value)  # the client hears no path; the log has the why
        assert any("sha256" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
        assert await greedy(engine, "good", "sw", prompt) == hf_greedy(merged["sw"], prompt, 20)
        assert await greedy(engine, "res", "resident", prompt) == hf_greedy(merged["resident"], prompt, 20)
    finally:
        await engine.shutdown()
    assert observer.failures == ["te"]


async def test_plans_that_swap_embeddings_and_lm_head_serve_per_group(family, tmp_path):
    plans = {"sw": Plan(bottom=2, top=2, non_layer="language"), "te": Plan(bottom=3, top=1, non_layer=0.4)}
    jobs = [BuildJob(lang, family.languages[lang], plan) for lang, plan in plans.items()]
    packs = {p.name.removesuffix(".pack"): p for p in build_packs(family.math, jobs, tmp_path / "packs", progress=False)}
    engine = await started(family.math, packs)
    try:
        prompt = chat_ids(engine, "outer weights")
        got = await asyncio.gather(*[greedy(engine, lang, lang, prompt, 12) for lang in ["sw", "te", "resident"]])
    finally:
        await engine.shutdown()
    for lang, tokens in zip(["sw", "te"], got, strict=False):
        merged = merge_pack(family.math, packs[lang], tmp_path / f"merged-{lang}", progress=False)
        assert tokens == hf_greedy(merged, prompt, 12)
    assert got[2] == hf_greedy(family.math, prompt, 12)


async def test_seeded_sampling_is_reproducible_and_choices_differ(engine):
    prompt = chat_ids(engine, "sample")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, n=3, ignore_eos=True)
    first = await collect(engine, GenerationRequest("s1", prompt, params, "ja"))
    # the same request again, now sharing its batch with other traffic
    noise = asyncio.ensure_future(greedy(engine, "noise", "sw", prompt, 16))
    second = await collect(engine, GenerationRequest("s2", prompt, params, "ja"))
    await noise
    assert first["tokens"] == second["tokens"]
    assert len({tuple(t) for t in first["tokens"].values()}) == 3
    assert first["usage"] == (len(prompt), 48)


async def test_max_tokens_stop_strings_and_stop_ids_end_generation(engine):
    prompt = chat_ids(engine, "stops")

    def params(**extra) -> SamplingParams:
        return SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, **extra)

    free = await collect(engine, GenerationRequest("free", prompt, params()))
    tokens, text = free["tokens"][0], free["text"][0]
    assert len(tokens) == 40 and free["reasons"][0] == "length"
    stop, at = stop_string_in(text)
    cut = await collect(engine, GenerationRequest("cut", prompt, params(stop=(stop,))))
    assert cut["text"][0] == text[:at] and cut["reasons"][0] == "stop"
    token = tokens[4]
    by_id = await collect(engine, GenerationRequest("id", prompt, params(stop_token_ids=(token,))))
    assert by_id["tokens"][0] == tokens[: tokens.index(token) + 1]
    assert by_id["reasons"][0] == "stop"


async def test_full_queue_and_oversized_prompts_are_refused(demo):
    engine = await started(demo.resident, demo.packs, max_batch_size=1, max_waiting=2)
    try:
        prompt = chat_ids(engine, "queue")
        long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        running = engine.generate(GenerationRequest("run", prompt, long))
        await running.__anext__()
        waiting = [engine.generate(GenerationRequest(f"w{i}", prompt, long)) for i in range(2)]
        with pytest.raises(QueueFullError):
            engine.generate(GenerationRequest("over", prompt, long))
        for stream in [running, *waiting]:
            await stream.aclose()
        await until(lambda: engine.stats().waiting == 0 and engine.stats().running == 0)
        with pytest.raises(PromptTooLongError, match="512"):
            engine.generate(GenerationRequest("big", [65] * 600, GREEDY))
        with pytest.raises(InvalidRequestError, match="no pack"):
            engine.generate(GenerationRequest("xx", prompt, GREEDY, "xx"))
        with pytest.raises(InvalidRequestError, match="token ids"):
            engine.generate(GenerationRequest("ids", [10**6], GREEDY))
        assert len(await greedy(engine, "after", "sw", prompt, 4)) == 4  # nothing leaked, still serving
    finally:
        await engine.shutdown()


async def test_a_failing_step_fails_its_batch_and_the_engine_keeps_serving(demo, merged):
    observer = RecordingObserver()
    engine = await started(demo.resident, demo.packs, observer=observer, pack_memory=one_pack_budget(demo))
    try:
        prompt = chat_ids(engine, "boom")
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        stream = engine.generate(GenerationRequest("unlucky", prompt, params, "sw"))
        await stream.__anext__()
        engine.faults.fail_steps(1)  # as a CUDA out-of-memory in the forward would
        with pytest.raises(EngineError, match="generation failed") as failed:
            async for _ in stream:
                pass
        assert "injected" not in str(failed.value)  # the client hears no exception text
        assert observer.step_failures == 1
        assert engine.stats().running == 0 and engine.stats().kv_tokens_used == 0
        # sw was released: te (room for one pack only) can take its place
        assert await greedy(engine, "next", "te", prompt, 8) == hf_greedy(merged["te"], prompt, 8)
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("language", ["sw", "resident"])
async def test_in_bfloat16_each_token_has_the_merged_models_log_probability(demo, merged, device, language):
    """Low precision may flip a near-tie, so greedy tokens can legitimately differ from the fp32
    oracle: teacher-forced, every token the engine chose has transformers' bf16 log-probability
    on the merged checkpoint, within bf16's tolerance."""
    engine = await started(demo.resident, demo.packs, device=device, dtype="bfloat16")
    try:
        prompt = chat_ids(engine, f"bf16 in {language}")
        params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0, ignore_eos=True)
        got = await collect(engine, GenerationRequest("bf16", prompt, params, language))
    finally:
        await engine.shutdown()
    tokens, logprobs = got["tokens"][0], got["logprobs"][0]
    ref = hf_logprobs(merged[language], prompt, tokens, dtype=torch.bfloat16, device=device)
    for step, lp in enumerate(logprobs):
        assert abs(lp.logprob - ref[step, lp.token_id].item()) < 0.3, step
        assert ref[step, lp.token_id] >= ref[step].max() - 0.3  # a top choice, up to bf16 noise


async def test_under_a_steady_mix_with_room_for_one_pack_no_language_starves(demo, merged):
    """sw traffic never stops and always fills the batch; te must still get its turn."""
    budget = one_pack_budget(demo)
    engine = await started(demo.resident, demo.packs, max_batch_size=4, pack_memory=budget, host_pack_memory=budget)
    try:
        prompt = chat_ids(engine, "steady traffic")
        flowing = True

        async def steady(k: int) -> int:
            done = 0
            while flowing:
                await greedy(engine, f"sw-{k}-{done}", "sw", prompt, 12)
                done += 1
            return done

        flood = [asyncio.ensure_future(steady(k)) for k in range(6)]
        await until(lambda: engine.stats().running == 4)
        te_prompt = chat_ids(engine, "my turn, in te")
        got = await asyncio.wait_for(greedy(engine, "te", "te", te_prompt, 8), timeout=60)
        flowing = False
        served = await asyncio.gather(*flood)
    finally:
        await engine.shutdown()
    assert got == hf_greedy(merged["te"], te_prompt, 8)
    assert sum(served) > 6  # sw kept being served around it


async def test_a_request_whose_rows_fail_fails_alone_and_the_rest_of_its_batch_equals_the_merges(engine, merged):
    prompts = {lang: chat_ids(engine, f"isolation in {lang}") for lang in LANGUAGES}
    engine.faults.poisoned.add("poisoned")
    neighbours = [greedy(engine, f"n-{lang}", lang, prompts[lang], 16) for lang in LANGUAGES]
    doomed = greedy(engine, "poisoned", "sw", prompts["sw"], 16)
    *got, failed = await asyncio.gather(*neighbours, doomed, return_exceptions=True)
    assert isinstance(failed, EngineError) and "injected" not in str(failed)
    for lang, tokens in zip(LANGUAGES, got, strict=True):
        assert tokens == hf_greedy(merged[lang], prompts[lang], 16), lang
    assert engine.stats().running == 0


async def test_degenerate_sampling_values_serve_like_greedy(engine, merged):
    """A temperature below 1e-5 is greedy; a top_p so small it is 0 in float32 keeps the top token."""
    prompt = chat_ids(engine, "degenerate")
    want = hf_greedy(merged["ja"], prompt, 12)
    for k, params in enumerate([
        SamplingParams(max_tokens=12, temperature=1e-39),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=5e-324, seed=2**63 - 1),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=5e-324, seed=-(2**63), n=2),
    ]):
        got = await collect(engine, GenerationRequest(f"degenerate-{k}", prompt, params, "ja"))
        assert all(tokens == want for tokens in got["tokens"].values()), params
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=2**64)
