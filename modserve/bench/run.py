"""Scenarios run side by side in one process, on the same model and the same requests.

- ceiling: one merged checkpoint serving the widest mix's requests — the best case;
- mixed: the resident plus N packs, mixed-language traffic (native; vLLM when installed);
- delta_mixed: the same with delta packs (native: resident weights plus B·(A·x) per language);
- grouped_mixed, grouped_delta_mixed: vLLM with every language in each step
  (`engine.pack_mode: grouped`), exact or delta packs;
- lora_mixed: vLLM with the packs as LoRA adapters (`engine.pack_mode: lora`), one batch;
- swap_per_request: the naive baseline — one pack slot, nothing kept in host memory, one
  language at a time: every change of language reloads the swapped layers from disk;
- one_model_per_language: N merged checkpoints side by side, each on its own engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from modserve.bench.workloads import BenchRequest, Workload, make_requests
from modserve.config import ServeConfig, load_serve_config
from modserve.engine import create_engine
from modserve.engine.base import RESIDENT, Engine, GenerationRequest, SamplingParams
from modserve.engine.loading import chat_token_ids

VLLM_SCENARIOS = {  # by engine.pack_mode and the kind of packs
    ("exact", "exact"): "mixed", ("grouped", "exact"): "grouped_mixed", ("grouped", "delta"): "grouped_delta_mixed",
    ("lora", "exact"): "lora_mixed",
}


@dataclass
class Timing:
    language: str
    ttft: float
    gaps: list[float]
    latency: float
    output_tokens: int
    prompt_tokens: int


@dataclass
class ScenarioResult:
    scenario: str
    backend: str
    languages: int
    mix: str
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    pack_loads: int
    swaps: int
    peak_memory_bytes: int
    weight_bytes: int  # resident + packs (or N full models), from the engines' own accounting
    prompt_tokens: int = 0  # the traffic's size: the ceiling serves the same as the widest mix
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class Counting:
    """An EngineObserver that counts pack loads, swaps and steps for the report."""

    def __init__(self):
        self.loads = self.swaps = self.failures = 0

    def pack_loaded(self, language, source, seconds):
        self.loads += 1

    def pack_load_failed(self, language, reason):
        self.failures += 1

    def pack_swapped(self, language, seconds):
        self.swaps += 1

    def step(self, languages, batch_size):
        pass

    def step_failed(self):
        self.failures += 1


class MemoryPeak:
    """Peak memory above the level at entry: anonymous RSS on CPU, allocated bytes on CUDA.

    Anonymous RSS leaves out memory-mapped checkpoint pages, which the kernel can drop.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def __enter__(self) -> MemoryPeak:
        release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = anonymous_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, anonymous_rss() - self.base)

    def __exit__(self, *_) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, anonymous_rss() - self.base)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so each scenario starts level."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def anonymous_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Setup:
    """What every scenario shares: paths, engine settings, the tokenizer's chat template."""

    resident: Path
    packs: dict[str, Path]
    merged: dict[str, Path]  # language -> merged checkpoint (for ceiling and one-model-per-language)
    delta_packs: dict[str, Path] = field(default_factory=dict)  # language -> delta pack (synthetic models)
    lora_rank: int | None = None  # pack_mode lora: the adapters' rank
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 16
    max_model_len: int = 512
    vllm_args: dict = field(default_factory=dict)

    def config(self, resident: Path, packs: dict[str, Path], backend: str = "native", **engine) -> ServeConfig:
        flags = {
            "model": {"resident": str(resident), "device": self.device, "dtype": self.dtype},
            "packs": {lang: str(p) for lang, p in packs.items()},
            "engine": {
                "backend": backend,
                "max_batch_size": self.max_batch_size,
                "max_model_len": self.max_model_len,
                "vllm": self.vllm_args,
                **engine,
            },
        }
        return load_serve_config(None, flags, environ={})


async def start(config: ServeConfig, observer: Counting) -> Engine:
    engine = create_engine(config)
    engine.observer = observer
    await engine.start()
    return engine


def chat_ids(engine: Engine, question: str) -> list[int]:
    return chat_token_ids(engine.tokenizer, [{"role": "user", "content": question}])


async def timed(engine: Engine, request_id: str, prompt: list[int], language: str, output_len: int) -> Timing:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = last = time.perf_counter()
    ttft, gaps, tokens = 0.0, [], 0
    async for out in engine.generate(GenerationRequest(request_id, prompt, params, language)):
        now = time.perf_counter()
        new = sum(len(c.token_ids) for c in out.choices)
        if not new:
            continue
        if tokens == 0:
            ttft = now - start
        else:
            gaps.append((now - last) / new)
        tokens, last = tokens + new, now
    return Timing(language, ttft, gaps, time.perf_counter() - start, tokens, len(prompt))


async def drive(
    engines: dict[str, Engine], requests: list[BenchRequest], workload: Workload, target
) -> tuple[list[Timing], float]:
    """Send the requests (closed loop or Poisson arrivals); `target(lang)` -> (engine key, language)."""
    gate = asyncio.Semaphore(workload.concurrency if workload.rate is None else 1 << 30)
    begin = time.perf_counter()

    async def one(k: int, request: BenchRequest) -> Timing:
        key, language = target(request.language)
        engine = engines[key]
        prompt = chat_ids(engine, request.question)
        delay = request.arrival - (time.perf_counter() - begin)
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            return await timed(engine, f"bench-{k}", prompt, language, workload.output_len)

    timings = await asyncio.gather(*(one(k, r) for k, r in enumerate(requests)))
    return list(timings), time.perf_counter() - begin


async def drive_one_language_at_a_time(
    engine: Engine, requests: list[BenchRequest], workload: Workload
) -> tuple[list[Timing], float]:
    """The naive server: runs of same-language requests, each run drained before the next starts."""
    runs: list[list[BenchRequest]] = []
    for request in requests:
        if runs and runs[-1][0].language == request.language:
            runs[-1].append(request)
        else:
            runs.append([request])
    timings, begin = [], time.perf_counter()
    for run in runs:
        done, _ = await drive({"e": engine}, run, workload, lambda lang: ("e", lang))
        timings += done
    return timings, time.perf_counter() - begin


def summarize(
    scenario: str, backend: str, workload: Workload, timings: list[Timing], seconds: float,
    observer: Counting, memory: MemoryPeak, weight_bytes: int,
) -> ScenarioResult:
    gaps = [g for t in timings for g in t.gaps]
    tokens = sum(t.output_tokens for t in timings)
    return ScenarioResult(
        scenario=scenario,
        backend=backend,
        languages=len(workload.languages),
        mix=workload.mix,
        tokens_per_s=tokens / seconds,
        requests_per_s=len(timings) / seconds,
        ttft_p50_ms=1e3 * percentile([t.ttft for t in timings], 0.5),
        ttft_p99_ms=1e3 * percentile([t.ttft for t in timings], 0.99),
        itl_p50_ms=1e3 * percentile(gaps, 0.5),
        itl_p99_ms=1e3 * percentile(gaps, 0.99),
        pack_loads=observer.loads,
        swaps=observer.swaps,
        peak_memory_bytes=memory.peak,
        weight_bytes=weight_bytes,
        prompt_tokens=sum(t.prompt_tokens for t in timings),
    )


def engine_bytes(engine: Engine) -> int:
    stats = engine.stats()
    return stats.resident_bytes + stats.pack_bytes_by_tier.get("device", 0)


async def warm(engines: dict[str, Engine], setup_languages: list[tuple[str, str]]) -> None:
    """One short request per (engine, language): loads packs, runs allocator warm-up."""
    for key, language in setup_languages:
        engine = engines[key]
        await timed(engine, f"warm-{key}-{language}", chat_ids(engine, "warm up"), language, 2)


async def rehearsed(
    engines: dict[str, Engine], observer: Counting, workload: Workload, prompts, run: Callable[[list[BenchRequest]], Awaitable]
):
    """`run` on the workload's requests, after one untimed pass of other requests of the same
    workload (its next seed), so that every row measures a warm server: kernels are built for
    each new batch shape on first use (oneDNN on CPU; about 0.5 ms per shape and linear), and
    a mixed step meets many. The rehearsal counts no loads or swaps, and leaves no prefix
    cached."""
    counts = observer.loads, observer.swaps
    await run(make_requests(replace(workload, seed=workload.seed + 1), prompts))
    observer.loads, observer.swaps = counts
    for engine in engines.values():
        await engine.reset_prefix_cache()
    return await run(make_requests(workload, prompts))


async def ceiling(setup: Setup, workload: Workload, prompts, backend: str = "native") -> ScenarioResult:
    """The workload's own requests, every one on the first language's merged checkpoint: the
    same prompts and outputs as the mixed scenario, with no language ever apart — the best
    any runtime could do for that traffic."""
    observer = Counting()
    with MemoryPeak(torch.device(resolve(setup.device))) as memory:
        engine = await start(setup.config(setup.merged[workload.languages[0]], {}, backend), observer)
        try:
            engines = {"e": engine}
            await warm(engines, [("e", RESIDENT)])
            timings, seconds = await rehearsed(
                engines, observer, workload, prompts, lambda rs: drive(engines, rs, workload, lambda _: ("e", RESIDENT))
            )
            weights = engine_bytes(engine)
        finally:
            await engine.shutdown()
    result = summarize("ceiling", backend, workload, timings, seconds, observer, memory, weights)
    if backend == "vllm":
        result.peak_memory_bytes = 0  # vLLM's engine core is another process: not measured here
    return result


async def mixed(setup: Setup, workload: Workload, prompts, kind: str = "exact") -> ScenarioResult:
    """Native: a fresh engine holding exactly the workload's packs (exact or delta), so its
    memory is measured."""
    source = setup.delta_packs if kind == "delta" else setup.packs
    packs = {lang: source[lang] for lang in workload.languages}
    observer = Counting()
    with MemoryPeak(torch.device(resolve(setup.device))) as memory:
        engine = await start(setup.config(setup.resident, packs), observer)
        try:
            engines = {"e": engine}
            await warm(engines, [("e", lang) for lang in workload.languages])
            timings, seconds = await rehearsed(
                engines, observer, workload, prompts, lambda rs: drive(engines, rs, workload, lambda lang: ("e", lang))
            )
            weights = engine_bytes(engine)
        finally:
            await engine.shutdown()
    scenario = "delta_mixed" if kind == "delta" else "mixed"
    return summarize(scenario, "native", workload, timings, seconds, observer, memory, weights)


async def mixed_vllm(
    setup: Setup, workloads: list[Workload], prompts, pack_mode: str = "exact", kind: str = "exact"
) -> list[ScenarioResult]:
    """vLLM: one engine with every pack serves each workload in turn — its start-up is slow, and
    its memory lives in vLLM's own process (reported as weights, not as this process's peak).
    `pack_mode: grouped` shares each step between languages (`kind`: its exact or delta
    packs); `pack_mode: lora` serves the packs as LoRA adapters of rank `setup.lora_rank`."""
    observer = Counting()
    mode = {"pack_mode": pack_mode} | ({"lora_rank": setup.lora_rank} if pack_mode == "lora" else {})
    packs = setup.delta_packs if kind == "delta" else setup.packs
    engine = await start(setup.config(setup.resident, packs, "vllm", **mode), observer)
    scenario = VLLM_SCENARIOS[pack_mode, kind]
    engines, results = {"e": engine}, []
    try:
        stats = engine.stats()
        pack_bytes = (stats.pack_bytes_by_tier.get("device", 0) + stats.pack_bytes_by_tier.get("host", 0)) / len(setup.packs)
        for workload in workloads:
            await warm(engines, [("e", lang) for lang in workload.languages])
            observer.loads = observer.swaps = 0
            by_language = partial(drive, engines, workload=workload, target=lambda lang: ("e", lang))
            # leaves no earlier workload's prompts cached, as the ceiling's fresh engine
            timings, seconds = await rehearsed(engines, observer, workload, prompts, by_language)
            weights = stats.resident_bytes + int(pack_bytes * len(workload.languages))
            no_memory = MemoryPeak(torch.device("cpu"))
            results.append(summarize(scenario, "vllm", workload, timings, seconds, observer, no_memory, weights))
    finally:
        await engine.shutdown()
    return results


async def swap_per_request(setup: Setup, workload: Workload, prompts) -> ScenarioResult:
    packs = {lang: setup.packs[lang] for lang in workload.languages}
    one_pack = max(p.joinpath("blocks.safetensors").stat().st_size for p in packs.values())
    observer = Counting()
    with MemoryPeak(torch.device(resolve(setup.device))) as memory:
        config = setup.config(setup.resident, packs, pack_memory=int(one_pack * 1.2), host_pack_memory=0)
        engine = await start(config, observer)
        try:
            await warm({"e": engine}, [("e", workload.languages[0])])
            observer.loads = 0
            timings, seconds = await rehearsed(
                {"e": engine}, observer, workload, prompts, lambda rs: drive_one_language_at_a_time(engine, rs, workload)
            )
            weights = engine_bytes(engine)
        finally:
            await engine.shutdown()
    result = summarize("swap_per_request", "native", workload, timings, seconds, observer, memory, weights)
    result.swaps = observer.loads  # every reload is a swap of the outer layers
    return result


async def one_model_per_language(setup: Setup, workload: Workload, prompts) -> ScenarioResult:
    observer = Counting()
    engines: dict[str, Engine] = {}
    with MemoryPeak(torch.device(resolve(setup.device))) as memory:
        try:
            for lang in workload.languages:
                engines[lang] = await start(setup.config(setup.merged[lang], {}), observer)
            await warm(engines, [(lang, RESIDENT) for lang in workload.languages])
            timings, seconds = await rehearsed(
                engines, observer, workload, prompts, lambda rs: drive(engines, rs, workload, lambda lang: (lang, RESIDENT))
            )
            weights = sum(engine_bytes(e) for e in engines.values())
        finally:
            for engine in engines.values():
                await engine.shutdown()
    return summarize("one_model_per_language", "native", workload, timings, seconds, observer, memory, weights)


def resolve(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
