"""bench.json, the Markdown table, and the plot (throughput and memory vs languages)."""

from __future__ import annotations

import json
from pathlib import Path

from modserve.files import write_atomic, write_text_atomic

LINES = {
    ("mixed", "native"): ("modserve mixed (native)", "-o"),
    ("delta_mixed", "native"): ("modserve delta packs (native)", "-.o"),
    ("mixed", "vllm"): ("modserve mixed (vLLM, language slices)", "-s"),
    ("grouped_mixed", "vllm"): ("modserve grouped (vLLM, one step)", "--s"),
    ("grouped_delta_mixed", "vllm"): ("modserve grouped, delta packs (vLLM)", ":s"),
    ("lora_mixed", "vllm"): ("modserve LoRA adapters (vLLM)", "-.s"),
    ("swap_per_request", "native"): ("swap per request", "--^"),
    ("one_model_per_language", "native"): ("one model per language", ":D"),
}


def describe_ranks(delta: dict) -> str:
    """The delta packs' ranks for a label: one number, or each language's."""
    ranks = delta["rank"]
    if len(set(ranks.values())) == 1:
        return f"rank {next(iter(ranks.values()))}"
    return "ranks " + ", ".join(f"{lang} {rank}" for lang, rank in ranks.items())


def markdown(report: dict) -> str:
    head = (
        "| scenario | backend | langs | tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        "| pack loads | swaps | weights MB | peak MB |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = [
        f"| {s['scenario']} | {s['backend']} | {s['languages']} | {s['tokens_per_s']:.0f} | {s['requests_per_s']:.2f} "
        f"| {s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} | {s['itl_p50_ms']:.1f} / {s['itl_p99_ms']:.1f} "
        f"| {s['pack_loads']} | {s['swaps']} | {s['weight_bytes'] / 2**20:.0f} | {s['peak_memory_bytes'] / 2**20:.0f} |"
        for s in report["scenarios"]
    ]
    ratios = report["ratios"]
    spread, passes = ratios.get("spread", {}), report["workload"].get("repeats", 1)
    figures = [
        f"- {name}: {value:.4g}" + (f" ({spread[name][0]:.4g}–{spread[name][1]:.4g} over {passes} passes)" if name in spread else "")
        for name, value in ratios.items() if isinstance(value, float)
    ]
    if passes > 1:
        figures.insert(0, f"- {passes} passes over every scenario: each row is the pass of median tok/s; "
                          "each ratio the median of the passes' own ratios (their range in brackets)")
    for name, figure in ratios.get("router", {}).items():
        figures.append(f"- router {name}: p50 {figure['p50_us']:.0f} µs, p99 {figure['p99_us']:.0f} µs")
    model = report["model"]
    if model.get("held_out_top1"):
        top1, guess = model["held_out_top1"], model["majority_byte_top1"]
        figures.append(
            f"- experts trained in {model['experts_seconds']:.0f} s; held-out top-1 / most frequent byte's: "
            + ", ".join(f"{name} {top1[name]:.2f} / {guess[name]:.2f}" for name in top1)
        )
    delta = model.get("delta") or {}
    if delta.get("rank"):
        tried = delta.get("ranks_tried", [])
        rule = (f" (each the smallest of {', '.join(map(str, tried))} keeping top-1 agreement ≥ {delta['top1_floor']} "
                "with its exact pack)" if len(tried) > 1 else "")
        figures.append(f"- delta packs: {describe_ranks(delta)}{rule}")
    if delta:
        figures.append(f"- LoRA adapters: rank {delta['lora_rank'] or 'full'}")
    figures += [f"- **failed**: {f['scenario']}: {f['error']}" for f in report.get("failed", [])]
    api = report["api"]
    figures.append(
        f"- API overhead (server vs direct engine, p50): {api['overhead_p50_ms']:.1f} ms "
        f"({api['http_p50_ms']:.1f} vs {api['direct_p50_ms']:.1f} ms)"
    )
    machine = report["machine"]
    where = f"{machine.get('gpu') or machine['cpu']}, {machine['cores']} threads, torch {machine['torch']}"
    return head + "\n".join(rows) + "\n\n" + "\n".join(figures) + f"\n\nMachine: {where}; {report['seconds']:.0f} s.\n"


def figure(report: dict):
    """Tokens/s and weights held against the language counts that ran, one line per scenario."""
    from matplotlib.figure import Figure  # no pyplot: nothing global to select or close

    fig = Figure(figsize=(12, 4.5))
    speed, memory = fig.subplots(1, 2)
    for (scenario, backend), (label, style) in LINES.items():
        points = sorted((s["languages"], s) for s in report["scenarios"] if (s["scenario"], s["backend"]) == (scenario, backend))
        if not points:
            continue
        xs = [n for n, _ in points]
        speed.plot(xs, [s["tokens_per_s"] for _, s in points], style, label=label)
        memory.plot(xs, [s["weight_bytes"] / 2**20 for _, s in points], style, label=label)
    for s in report["scenarios"]:
        if s["scenario"] == "ceiling":
            speed.axhline(s["tokens_per_s"], color="grey", linestyle="--", linewidth=1, label=f"ceiling ({s['backend']})")
    speed.set(title="Output throughput", xlabel="languages in the traffic", ylabel="tokens / s")
    memory.set(title="Weights held (resident + packs or adapters, or N models)", xlabel="languages in the traffic", ylabel="MiB")
    counts = sorted({s["languages"] for s in report["scenarios"]})
    for axis in (speed, memory):
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, labels=[str(n) for n in counts])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("modserve bench")
    fig.tight_layout()
    return fig


def plot(report: dict, file: Path) -> None:
    figure(report).savefig(file, dpi=120, format="png")


def write(report: dict, out: Path) -> list[Path]:
    """bench.json, bench.md and bench.png in `out`, each written whole."""
    return [
        write_text_atomic(out / "bench.json", json.dumps(report, indent=2) + "\n"),
        write_text_atomic(out / "bench.md", markdown(report)),
        write_atomic(out / "bench.png", lambda tmp: plot(report, tmp)),
    ]
