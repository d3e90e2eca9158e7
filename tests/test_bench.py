"""modserve bench runs every scenario end to end and reports every figure (no speed asserted)."""

from __future__ import annotations

import json

from matplotlib.image import imread

from modserve.bench.report import markdown, write
from modserve.bench.suite import BenchOptions, run_suite
from modserve.bench.workloads import Workload, load_prompts, make_requests


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


def test_bench_runs_every_scenario_and_writes_json_table_and_plot(tmp_path):
    options = BenchOptions(model="tiny", num_requests=8, output_len=4, concurrency=4,
                           language_counts=(1, 4), backends=("native",), workdir=tmp_path)
    report = run_suite(options)
    scenarios = {(s["scenario"], s["languages"]) for s in report["scenarios"]}
    assert scenarios == {("ceiling", 1), ("mixed", 1), ("mixed", 4), ("swap_per_request", 1),
                         ("swap_per_request", 4), ("one_model_per_language", 1), ("one_model_per_language", 4)}
    for s in report["scenarios"]:
        assert s["tokens_per_s"] > 0 and s["weight_bytes"] > 0 and s["ttft_p50_ms"] > 0
    ratios = report["ratios"]
    assert {"native_mixed4_vs_ceiling", "memory_4packs_vs_4models", "native_mixed4_vs_swap_per_request4"} <= set(ratios)
    assert ratios["memory_4packs_vs_4models"] < 1.0  # four packs cost less than four models
    assert set(ratios["router"]) == {"py3langid", "langdetect"}
    swap4 = next(s for s in report["scenarios"] if (s["scenario"], s["languages"]) == ("swap_per_request", 4))
    mixed4 = next(s for s in report["scenarios"] if (s["scenario"], s["languages"]) == ("mixed", 4))
    assert swap4["pack_loads"] > mixed4["pack_loads"] == 4  # the baseline reloads; modserve loads each pack once
    assert report["api"]["http_p50_ms"] > 0
    files = write(report, tmp_path / "out")
    assert json.loads(files[0].read_text())["ratios"] == json.loads(json.dumps(ratios))
    assert "| mixed | native | 4 |" in markdown(report)
    assert imread(files[2]).shape[1] > 800
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("modserve-bench-")] == []
