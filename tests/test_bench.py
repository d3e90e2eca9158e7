"""modserve bench runs every scenario end to end and reports every figure (no speed asserted)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import load_file

from modserve.bench.models import (
    DELTA_TOP1_FLOOR,
    PLANS,
    SPECS,
    build_delta_packs,
    default_delta_rank,
    pack_parameters,
    parameter_shapes,
    rank_ladder,
)
from modserve.bench.report import figure, markdown, write
from modserve.bench.run import Counting, ScenarioResult, rehearsed
from modserve.bench.suite import BenchOptions, combine, ratios, run_suite
from modserve.bench.workloads import Workload, load_prompts, make_requests
from modserve.checkpoint import layer_index
from modserve.demo.finetune import HELD_OUT, Recipe, layer_sets, read_questions, train_family
from modserve.demo.synthetic import TinySpec
from modserve.errors import ModserveError
from modserve.packs.build import BuildJob
from modserve.packs.fidelity import REPOSITORY_MGSM
from modserve.packs.format import read_manifest
from modserve.packs.lowrank import RankChoice, factorize

QUICK_RECIPE = Recipe(base_steps=24, expert_steps=8, batch_size=4, score_questions=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_family(tmp_path_factory.mktemp("trained"), TinySpec(), ("sw", "te"), QUICK_RECIPE)


def weights(path):
    return load_file(path / "model.safetensors")


def test_finetuned_experts_change_their_layers_with_a_real_fine_tunes_spectrum(trained):
    """Language experts moved only the outer layers, the math expert only the middle ones, and
    each Δ is full-rank with a decaying spectrum: neither planted low rank nor random jitter."""
    spec = TinySpec()
    outer, middle = layer_sets(spec)
    base, math, sw = (weights(p) for p in (trained.family.base, trained.family.math, trained.family.languages["sw"]))
    for name, tensor in base.items():
        layer = layer_index(name)
        assert torch.equal(sw[name], tensor) == (layer not in outer), name
        assert torch.equal(math[name], tensor) == (layer not in middle), name
    for name in [n for n in base if layer_index(n) in outer and base[n].dim() == 2]:
        delta = sw[name] - base[name]
        assert 1e-3 < float(delta.norm() / base[name].norm()) < 0.1, name  # a fine-tune's few percent
        kept = factorize(delta, RankChoice(rank=8)).energy
        jitter = factorize(torch.randn_like(delta), RankChoice(rank=8)).energy
        singular = torch.linalg.svdvals(delta)
        assert jitter + 0.2 < kept < 0.999, name
        assert int((singular > 1e-2 * singular[0]).sum()) > 8, name  # no planted rank: more moved than 8 directions


def test_finetune_is_deterministic_and_the_trained_models_predict_text(trained, tmp_path):
    again = train_family(tmp_path, TinySpec(), ("sw", "te"), QUICK_RECIPE)
    for name in ("base", "math"):
        first = (getattr(trained.family, name) / "model.safetensors").read_bytes()
        assert first == (getattr(again.family, name) / "model.safetensors").read_bytes()
    assert weights(trained.family.languages["te"]).keys() == weights(again.family.languages["te"]).keys()
    assert (trained.family.languages["te"] / "model.safetensors").read_bytes() == (
        again.family.languages["te"] / "model.safetensors"
    ).read_bytes()
    # Held-out MGSM text, teacher-forced: far above uniform chance (1/256) and above always
    # guessing the text's most frequent byte.
    for model in ("base", "sw", "te"):
        assert trained.held_out_top1[model] > max(50 / 256, 1.5 * trained.majority_top1[model]), model
    assert trained.held_out_top1 == again.held_out_top1


def test_medium_model_is_the_issues_181m_llama_and_its_delta_rank_fits_the_budget():
    spec, plan = SPECS["medium"], PLANS["medium"]
    shapes = parameter_shapes(spec)
    total = sum(s.numel() for s in shapes.values())
    assert total == 180_929_536 and total >= 150e6
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.intermediate_size) == (
        16, 1024, 16, 4, 2816)
    assert spec.dtype == "float32"
    assert plan.swapped_layers(spec.num_layers) == [0, 1, 2, 14, 15]
    rank = default_delta_rank(shapes, plan, spec.num_layers)
    fits = [(total + 4 * pack_parameters(shapes, plan, spec.num_layers, r)) / (4 * total) for r in (rank, rank + 8)]
    assert rank == 96 and fits[0] <= 0.3 < fits[1]
    exact = pack_parameters(shapes, plan, spec.num_layers, None)
    assert exact == 5 * (11_274_240)  # five whole layers


def test_each_delta_pack_takes_the_smallest_rank_that_keeps_the_fidelity_floor(trained, tmp_path):
    """A rank below the floor is passed over, a rank that keeps it ends the search for that language."""
    assert rank_ladder(96) == [16, 32, 64, 96] and rank_ladder(16) == [16] and rank_ladder(40) == [16, 32, 40]
    jobs = [BuildJob(lang, path, PLANS["tiny"]) for lang, path in trained.family.languages.items()]
    prompts = {lang: read_questions(REPOSITORY_MGSM, lang, slice(HELD_OUT, HELD_OUT + 2)) for lang in ("sw", "te")}
    full = 704  # above every matrix's rank: capped, so exact up to float rounding

    climbed = build_delta_packs(trained.family.math, jobs, tmp_path / "up", prompts, [1, full])
    for lang, pack in climbed.items():
        assert read_manifest(tmp_path / "up" / "rank-1" / f"{lang}.pack").fidelity["top1_agreement"] < DELTA_TOP1_FLOOR
        assert read_manifest(pack).delta["rank"] == full and read_manifest(pack).fidelity["top1_agreement"] >= DELTA_TOP1_FLOOR

    stopped = build_delta_packs(trained.family.math, jobs, tmp_path / "down", prompts, [full, 1])
    assert {lang: read_manifest(p).delta["rank"] for lang, p in stopped.items()} == {"sw": full, "te": full}
    assert not (tmp_path / "down" / "rank-1").exists()


def row(scenario, backend, languages, tokens_per_s, weight_bytes=1, ttft_p99_ms=1.0):
    return ScenarioResult(scenario, backend, languages, "uniform", tokens_per_s, 1.0, 1.0, ttft_p99_ms, 1.0, 1.0,
                          0, 0, 10, weight_bytes)


def test_ratios_compare_delta_grouped_and_lora_rows_with_their_ceilings_and_read_fidelity_from_manifests():
    results = [
        row("ceiling", "native", 1, 500.0, 100), row("mixed", "native", 4, 250.0, 260),
        row("delta_mixed", "native", 4, 400.0, 120), row("one_model_per_language", "native", 4, 300.0, 400),
        row("swap_per_request", "native", 4, 100.0, 100),
        row("ceiling", "vllm", 1, 800.0, ttft_p99_ms=200.0), row("mixed", "vllm", 4, 600.0, ttft_p99_ms=900.0),
        row("lora_mixed", "vllm", 4, 200.0, ttft_p99_ms=300.0), row("grouped_mixed", "vllm", 4, 720.0, ttft_p99_ms=260.0),
        row("grouped_delta_mixed", "vllm", 4, 760.0, ttft_p99_ms=240.0),
    ]
    fidelity = {"sw": {"measured": True, "tokens": 300, "top1_agreement": 0.9, "kl_mean": 0.01},
                "te": {"measured": True, "tokens": 100, "top1_agreement": 0.5, "kl_mean": 0.05},
                "bn": {"measured": False}}
    model = {"swapped_layers": [0, 1, 2, 14, 15], "num_layers": 16, "delta": {"rank": 96, "fidelity": fidelity}}
    out = ratios(results, {"py3langid": {"p50_us": 50.0, "p99_us": 90.0}}, model)
    assert out["native_mixed4_vs_ceiling"] == 0.5 and out["native_delta_mixed4_vs_ceiling"] == 0.8
    assert out["memory_4packs_vs_4models"] == 0.65 and out["memory_4deltapacks_vs_4models"] == 0.3
    assert out["vllm_mixed4_vs_ceiling"] == 0.75 and out["vllm_lora_mixed4_vs_ceiling"] == 0.25
    assert out["vllm_mixed4_ttft_p99_vs_ceiling"] == 4.5 and out["vllm_lora_mixed4_ttft_p99_vs_ceiling"] == 1.5
    assert out["vllm_grouped_mixed4_vs_ceiling"] == 0.9 and out["vllm_grouped_mixed4_ttft_p99_vs_ceiling"] == 1.3
    assert out["vllm_grouped_delta_mixed4_vs_ceiling"] == 0.95 and out["vllm_grouped_delta_mixed4_ttft_p99_vs_ceiling"] == 1.2
    assert out["delta_top1_agreement"] == pytest.approx(0.8) and out["delta_kl_mean"] == pytest.approx(0.02)
    assert out["native_mixed4_vs_swap_per_request4"] == 2.5
    without = ratios(results[:5], {}, {**model, "delta": {"rank": 96, "fidelity": {}}})
    assert "delta_top1_agreement" not in without and "vllm_mixed4_ttft_p99_vs_ceiling" not in without


def test_passes_report_each_rows_median_pass_and_the_median_of_each_passes_own_ratios():
    speeds = [(100.0, 90.0), (80.0, 60.0), (120.0, 100.0)]  # (ceiling, grouped) per pass: the machine drifts
    passes = [[row("ceiling", "vllm", 1, c), row("grouped_delta_mixed", "vllm", 4, g)] for c, g in speeds]
    model = {"swapped_layers": [0, 15], "num_layers": 16, "delta": {}}
    rows, out = combine(passes, {}, model)
    assert [(r.scenario, r.tokens_per_s) for r in rows] == [("ceiling", 100.0), ("grouped_delta_mixed", 90.0)]
    assert rows[1].extra["passes_tokens_per_s"] == [90.0, 60.0, 100.0]
    assert out["vllm_grouped_delta_mixed4_vs_ceiling"] == pytest.approx(100 / 120)  # of 0.9, 0.75, 0.83
    assert out["spread"]["vllm_grouped_delta_mixed4_vs_ceiling"] == pytest.approx([0.75, 0.9])
    report = {"scenarios": [r.to_json() for r in rows], "ratios": out, "model": model, "failed": [],
              "workload": {"repeats": 3}, "api": {"overhead_p50_ms": 1.0, "http_p50_ms": 2.0, "direct_p50_ms": 1.0},
              "machine": {"cpu": "x86_64", "cores": 2, "torch": "2"}, "seconds": 1.0}
    assert "- vllm_grouped_delta_mixed4_vs_ceiling: 0.8333 (0.75–0.9 over 3 passes)" in markdown(report)
    single_rows, single = combine(passes[:1], {}, model)
    assert "spread" not in single and "passes_tokens_per_s" not in single_rows[0].extra
    with pytest.raises(ModserveError, match="--repeats"):
        BenchOptions(repeats=0)


def test_workloads_are_seeded_and_follow_the_mix(mgsm_dir):
    prompts = load_prompts(mgsm_dir, ("sw", "te", "bn", "ja"))
    assert all(len(p) == 250 for p in prompts.values())
    zipf = Workload(("sw", "te", "bn", "ja"), num_requests=400, mix="zipf", rate=50.0)
    requests = make_requests(zipf, prompts)
    assert requests == make_requests(zipf, prompts)
    counts = [sum(r.language == lang for r in requests) for lang in zipf.languages]
    assert counts == sorted(counts, reverse=True) and counts[0] > 2 * counts[3]
    arrivals = [r.arrival for r in requests]
    assert arrivals == sorted(arrivals) and 4 < arrivals[-1] < 16  # ~8 s at 50/s
    assert all(r.question in prompts[r.language] for r in requests)
    uniform = make_requests(Workload(("sw", "ja"), num_requests=200), load_prompts(None, ("sw", "ja")))
    assert 70 < sum(r.language == "sw" for r in uniform) < 130 and {r.arrival for r in uniform} == {0.0}


def test_built_in_prompts_differ_per_request_so_no_prefix_cache_serves_a_whole_prompt():
    prompts = load_prompts(None, ("sw", "bn"))
    requests = make_requests(Workload(("sw", "bn"), num_requests=40), prompts)
    assert len({r.question for r in requests}) > 30
    assert not any(digit in "".join(prompts["bn"]) for digit in "0123456789")  # Bengali digits


def test_bench_runs_every_scenario_and_writes_json_table_and_plot(tmp_path):
    options = BenchOptions(model="tiny", num_requests=8, output_len=4, concurrency=4,
                           language_counts=(1, 4), backends=("native",), workdir=tmp_path)
    report = run_suite(options)
    scenarios = {(s["scenario"], s["languages"]) for s in report["scenarios"]}
    assert scenarios == {("ceiling", 4), ("mixed", 1), ("mixed", 4), ("delta_mixed", 1), ("delta_mixed", 4),
                         ("swap_per_request", 1), ("swap_per_request", 4), ("one_model_per_language", 1),
                         ("one_model_per_language", 4)}
    for s in report["scenarios"]:
        assert s["tokens_per_s"] > 0 and s["weight_bytes"] > 0 and s["ttft_p50_ms"] > 0
    by_row = {(s["scenario"], s["languages"]): s for s in report["scenarios"]}
    # the ceiling serves the widest mix's own requests (a mix's prompts differ in length)
    assert by_row["ceiling", 4]["prompt_tokens"] == by_row["mixed", 4]["prompt_tokens"] != by_row["mixed", 1]["prompt_tokens"]
    figures = report["ratios"]
    assert {"native_mixed4_vs_ceiling", "memory_4packs_vs_4models", "native_mixed4_vs_swap_per_request4",
            "native_delta_mixed4_vs_ceiling", "memory_4deltapacks_vs_4models", "delta_top1_agreement"} <= set(figures)
    assert figures["memory_4packs_vs_4models"] < 1.0  # four packs cost less than four models
    assert figures["memory_4deltapacks_vs_4models"] < figures["memory_4packs_vs_4models"]
    assert 0.0 < figures["delta_top1_agreement"] <= 1.0
    model = report["model"]
    assert model["delta"]["rank"] == {"sw": 16, "te": 16, "bn": 16, "ja": 16} and model["delta"]["lora_rank"] == 16
    assert model["held_out_top1"]["base"] > 2 * model["majority_byte_top1"]["base"]
    assert set(figures["router"]) == {"py3langid", "langdetect"}
    swap4 = next(s for s in report["scenarios"] if (s["scenario"], s["languages"]) == ("swap_per_request", 4))
    mixed4 = next(s for s in report["scenarios"] if (s["scenario"], s["languages"]) == ("mixed", 4))
    assert swap4["pack_loads"] > mixed4["pack_loads"] == 4  # the baseline reloads; modserve loads each pack once
    assert report["api"]["http_p50_ms"] > 0
    files = write(report, tmp_path / "out")
    assert json.loads(files[0].read_text())["ratios"] == json.loads(json.dumps(figures))
    assert "| mixed | native | 4 |" in markdown(report) and "| delta_mixed | native | 4 |" in markdown(report)
    assert imread(files[2]).shape[1] > 800
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("modserve-bench-")] == []


def test_the_plot_marks_only_the_language_counts_that_ran():
    row = {"backend": "native", "tokens_per_s": 10.0, "weight_bytes": 2**20}
    report = {"scenarios": [{**row, "scenario": "ceiling", "languages": 4},
                            {**row, "scenario": "mixed", "languages": 1}, {**row, "scenario": "mixed", "languages": 4}]}
    for axis in figure(report).axes:
        assert list(axis.get_xticks()) == [1, 4]
        assert [label.get_text() for label in axis.get_xticklabels()] == ["1", "4"]
        assert list(axis.get_xticks(minor=True)) == []


def test_a_rehearsal_serves_other_requests_of_the_workload_first_and_counts_none_of_it():
    workload = Workload(("sw", "bn"), num_requests=12)
    prompts = load_prompts(None, workload.languages)
    observer, served = Counting(), []

    async def run(requests):
        served.append(requests)
        observer.loads, observer.swaps = observer.loads + 3, observer.swaps + 2
        return len(served)

    assert asyncio.run(rehearsed({}, observer, workload, prompts, run)) == 2  # the timed pass's result
    rehearsal, timed = served
    assert timed == make_requests(workload, prompts) != rehearsal
    assert len(rehearsal) == len(timed) and {r.language for r in rehearsal} <= set(workload.languages)
    assert (observer.loads, observer.swaps) == (3, 2)  # the timed pass's only
