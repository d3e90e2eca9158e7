"""`modserve bench`: prepare the models, run every scenario per language count, collect figures."""

from __future__ import annotations

import asyncio
import importlib.util
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from modserve import __version__
from modserve.bench import run
from modserve.bench.models import SPECS, prepare
from modserve.bench.overhead import api_overhead, router_latency
from modserve.bench.report import describe_ranks
from modserve.bench.workloads import BENCH_LANGUAGES, Workload, load_prompts
from modserve.errors import ModserveError


@dataclass
class BenchOptions:
    out: Path | None = None
    quick: bool = False
    mgsm: Path | None = None
    language_counts: tuple[int, ...] = (1, 2, 4, 8)
    mix: str = "uniform"
    rate: float | None = None
    concurrency: int = 16
    num_requests: int = 96
    output_len: int = 32
    model: str = "small"
    resident: Path | None = None
    packs: dict[str, Path] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    # vllm-grouped / vllm-lora: vLLM with pack_mode grouped / lora
    backends: tuple[str, ...] = ("native", "vllm", "vllm-grouped", "vllm-lora")
    vllm_args: dict = field(default_factory=dict)
    workdir: Path | None = None
    delta_rank: int | None = None  # None: per language, the smallest keeping top-1 ≥ 0.99 (models.build_delta_packs)
    repeats: int = 1  # passes over every scenario, one after another; rows and ratios are their medians

    def __post_init__(self):
        if self.quick:  # about 7 minutes on 2 shared CPU cores, every scenario (vLLM's LoRA: a third of it)
            self.model, self.num_requests, self.output_len = "tiny", 40, 24
            self.vllm_args = {"enforce_eager": True, **self.vllm_args}
        unknown = set(self.backends) - {"native", "vllm", "vllm-grouped", "vllm-lora"}
        if unknown:
            raise ModserveError(f"--backend: {', '.join(sorted(unknown))} is not native, vllm, vllm-grouped or vllm-lora")
        if self.repeats < 1:
            raise ModserveError(f"--repeats: {self.repeats} is below 1")
        if self.model not in SPECS and self.resident is None:
            raise ModserveError(f"--model: {self.model!r} is not one of {', '.join(SPECS)}")


def available_backends(options: BenchOptions) -> list[str]:
    return [b for b in options.backends if b == "native" or importlib.util.find_spec("vllm") is not None]


def run_suite(options: BenchOptions, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="modserve-bench-", dir=options.workdir) as scratch:
        started = time.perf_counter()
        console.log("preparing models, packs and merged checkpoints")
        wanted = BENCH_LANGUAGES[: max(options.language_counts)] if options.resident is None else sorted(options.packs)
        prompts = load_prompts(options.mgsm, tuple(wanted))
        setup, model = prepare(options, Path(scratch))
        languages = tuple(lang for lang in BENCH_LANGUAGES if lang in setup.packs) or tuple(sorted(setup.packs))
        counts = [n for n in options.language_counts if n <= len(languages)]
        passes: list[list[run.ScenarioResult]] = []

        def workload(n: int) -> Workload:
            return Workload(languages[:n], options.num_requests, options.output_len, options.mix,
                            options.rate, options.concurrency)

        failed: list[dict] = []
        native = "native" in available_backends(options)

        async def attempt(name: str, scenario, results: list[run.ScenarioResult]) -> None:
            """One scenario's figures; a scenario that fails is reported, and the rest still run."""
            console.log(name)
            try:
                got = await scenario
            except ModserveError as err:
                console.log(f"{name}: failed ({err})")
                failed.append({"scenario": name, "pass": len(passes), "error": str(err)})
                return
            results.extend(got if isinstance(got, list) else [got])

        async def one_pass() -> list[run.ScenarioResult]:
            results: list[run.ScenarioResult] = []
            if native:
                await attempt("native: ceiling", run.ceiling(setup, workload(max(counts)), prompts), results)
            for n in counts if native else []:
                await attempt(f"native: mixed, {n} language(s)", run.mixed(setup, workload(n), prompts), results)
            for n in counts if native and setup.delta_packs else []:
                await attempt(f"native: delta mixed, {n} language(s), {describe_ranks(model['delta'])}",
                              run.mixed(setup, workload(n), prompts, kind="delta"), results)
            if "vllm" in available_backends(options):
                await attempt("vllm: ceiling", run.ceiling(setup, workload(max(counts)), prompts, "vllm"), results)
                await attempt("vllm: mixed over every language count on one engine",
                              run.mixed_vllm(setup, [workload(n) for n in counts], prompts), results)
            if "vllm-grouped" in available_backends(options):
                await attempt("vllm: every language in each step (pack_mode grouped), every language count",
                              run.mixed_vllm(setup, [workload(n) for n in counts], prompts, "grouped"), results)
                if setup.delta_packs:
                    await attempt(f"vllm: pack_mode grouped with delta packs ({describe_ranks(model['delta'])})",
                                  run.mixed_vllm(setup, [workload(n) for n in counts], prompts, "grouped", "delta"),
                                  results)
            if "vllm-lora" in available_backends(options):
                await attempt(f"vllm: packs as LoRA adapters (rank {setup.lora_rank or 'full'}), every language count",
                              run.mixed_vllm(setup, [workload(n) for n in counts], prompts, "lora"), results)
            for n in counts if native else []:
                await attempt(f"native: swap per request, {n} language(s)",
                              run.swap_per_request(setup, workload(n), prompts), results)
                await attempt(f"native: one model per language, {n}",
                              run.one_model_per_language(setup, workload(n), prompts), results)
            return results

        async def everything() -> None:
            if native:
                console.log("warm-up (discarded): first-use costs would otherwise land on the first scenario")
                await run.mixed(setup, workload(min(2, len(languages))), prompts)
            for k in range(options.repeats):
                if options.repeats > 1:
                    console.log(f"pass {k + 1} of {options.repeats}")
                passes.append(await one_pass())

        asyncio.run(everything())
        console.log("router latency and API overhead")
        texts = [q for lang in languages for q in prompts[lang]]
        router = router_latency(texts)
        api = asyncio.run(api_overhead(setup, prompts[languages[0]][0]))
        report = {
            "modserve_version": __version__,
            "machine": machine(),
            "model": model,
            "workload": {
                "requests": options.num_requests, "output_len": options.output_len, "mix": options.mix,
                "rate": options.rate, "concurrency": options.concurrency,
                "prompts": str(options.mgsm) if options.mgsm else "built-in", "language_counts": counts,
                "repeats": options.repeats,
            },
            "failed": failed,
            "router": router,
            "api": api,
            "seconds": time.perf_counter() - started,
        }
        rows, report["ratios"] = combine(passes, router, model)
        report["scenarios"] = [r.to_json() for r in rows]
        return report


def combine(passes: list[list[run.ScenarioResult]], router: dict, model: dict) -> tuple[list[run.ScenarioResult], dict]:
    """One row per scenario and each ratio, over the passes. A row is the pass of median tokens/s
    (the lower one of an even count: a run that happened), every pass's tokens/s in its `extra`.
    A ratio is the median of the ratios each pass gives, since each compares rows with the
    ceiling of their own pass and so cancels the machine's drift between passes; `ratios.spread`
    holds the range of each that varied."""
    rows = []
    for key in dict.fromkeys((r.scenario, r.backend, r.languages) for results in passes for r in results):
        runs = [r for results in passes for r in results if (r.scenario, r.backend, r.languages) == key]
        row = sorted(runs, key=lambda r: r.tokens_per_s)[(len(runs) - 1) // 2]
        if len(passes) > 1:
            row = replace(row, extra={**row.extra, "passes_tokens_per_s": [r.tokens_per_s for r in runs]})
        rows.append(row)
    per_pass = [ratios(results, router, model) for results in passes]
    out = per_pass[0]
    if len(passes) > 1:
        out["spread"] = {}
        for name in [name for name, value in out.items() if isinstance(value, float)]:
            values = [p[name] for p in per_pass if name in p]
            out[name] = statistics.median(values)
            if min(values) != max(values):  # a measured figure, not one of the setup's
                out["spread"][name] = [min(values), max(values)]
    return rows, out


def find(results: list[run.ScenarioResult], scenario: str, backend: str, languages: int) -> run.ScenarioResult | None:
    for r in results:
        if (r.scenario, r.backend) == (scenario, backend) and (scenario == "ceiling" or r.languages == languages):
            return r
    return None


def ratios(results: list[run.ScenarioResult], router: dict, model: dict) -> dict:
    """The figures to compare across runs, each measured within this one run."""
    out: dict = {}
    native_ceiling, vllm_ceiling = find(results, "ceiling", "native", 1), find(results, "ceiling", "vllm", 1)
    for name, row, ceiling in [
        ("native_mixed4_vs_ceiling", find(results, "mixed", "native", 4), native_ceiling),
        ("native_delta_mixed4_vs_ceiling", find(results, "delta_mixed", "native", 4), native_ceiling),
        ("vllm_mixed4_vs_ceiling", find(results, "mixed", "vllm", 4), vllm_ceiling),
        ("vllm_grouped_mixed4_vs_ceiling", find(results, "grouped_mixed", "vllm", 4), vllm_ceiling),
        ("vllm_grouped_delta_mixed4_vs_ceiling", find(results, "grouped_delta_mixed", "vllm", 4), vllm_ceiling),
        ("vllm_lora_mixed4_vs_ceiling", find(results, "lora_mixed", "vllm", 4), vllm_ceiling),
    ]:
        if row and ceiling:
            out[name] = row.tokens_per_s / ceiling.tokens_per_s
    for name, row in [
        ("vllm_mixed4_ttft_p99_vs_ceiling", find(results, "mixed", "vllm", 4)),
        ("vllm_grouped_mixed4_ttft_p99_vs_ceiling", find(results, "grouped_mixed", "vllm", 4)),
        ("vllm_grouped_delta_mixed4_ttft_p99_vs_ceiling", find(results, "grouped_delta_mixed", "vllm", 4)),
        ("vllm_lora_mixed4_ttft_p99_vs_ceiling", find(results, "lora_mixed", "vllm", 4)),
    ]:
        if row and vllm_ceiling:
            out[name] = row.ttft_p99_ms / vllm_ceiling.ttft_p99_ms
    mixed4, delta4 = find(results, "mixed", "native", 4), find(results, "delta_mixed", "native", 4)
    models4, swap4 = find(results, "one_model_per_language", "native", 4), find(results, "swap_per_request", "native", 4)
    if mixed4 and models4:
        out["memory_4packs_vs_4models"] = mixed4.weight_bytes / models4.weight_bytes
        out["peak_memory_4packs_vs_4models"] = mixed4.peak_memory_bytes / max(1, models4.peak_memory_bytes)
    if delta4 and models4:
        out["memory_4deltapacks_vs_4models"] = delta4.weight_bytes / models4.weight_bytes
    if mixed4 and swap4:
        out["native_mixed4_vs_swap_per_request4"] = mixed4.tokens_per_s / swap4.tokens_per_s
    swapped, layers = len(model["swapped_layers"]), model["num_layers"]
    # Memory-bound decode reads each present language's swapped layers once per step.
    out["weight_read_bound_mixed4"] = layers / (layers - swapped + 4 * swapped)
    out.update(delta_fidelity(model.get("delta", {}).get("fidelity", {})))
    out["router"] = {name: {"p50_us": r["p50_us"], "p99_us": r["p99_us"]} for name, r in router.items()}
    return out


def delta_fidelity(per_language: dict[str, dict]) -> dict:
    """Token-weighted teacher-forced top-1 agreement and KL of the delta packs against their
    exact packs, as their manifests recorded them at build time."""
    measured = [f for f in per_language.values() if f and f.get("measured")]
    tokens = sum(f["tokens"] for f in measured)
    if not tokens:
        return {}
    return {
        "delta_top1_agreement": sum(f["top1_agreement"] * f["tokens"] for f in measured) / tokens,
        "delta_kl_mean": sum(f["kl_mean"] * f["tokens"] for f in measured) / tokens,
    }


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
