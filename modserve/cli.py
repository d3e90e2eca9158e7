"""The `modserve` command line: thin wrappers over the library, one command per job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from modserve.errors import ModserveError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__
)


def main() -> None:
    """Console entry: user errors print one red line naming the fault and exit 1."""
    try:
        app()
    except ModserveError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(1)


# --- offline: build, merge, demo ---------------------------------------------------------

ExpertOption = Annotated[
    list[str] | None, typer.Option("--expert", help="LANG=PATH of a language expert (repeatable)")
]
BottomOption = Annotated[int | None, typer.Option(help="layers taken from the expert at the bottom")]
TopOption = Annotated[int | None, typer.Option(help="layers taken from the expert at the top")]
TransitionOption = Annotated[int | None, typer.Option(help="blended layers at each boundary")]
WeightOption = Annotated[float | None, typer.Option(help="language weight in transition blends")]
NonLayerOption = Annotated[
    str | None, typer.Option(help="embeddings/norm/lm_head: resident, language, or a blend weight")
]


def parse_experts(values: list[str] | None, option: str = "--expert") -> dict[str, Path]:
    experts = {}
    for value in values or []:
        language, sep, path = value.partition("=")
        if not sep or not language or not path:
            raise ModserveError(f"{option}: expected LANG=PATH, got {value!r}")
        if language in experts:
            raise ModserveError(f"{option}: language {language!r} given twice")
        experts[language] = Path(path)
    return experts


def plan_flags(**flags) -> dict:
    return {name: value for name, value in flags.items() if value is not None}


@app.command()
def build(
    out: Annotated[Path | None, typer.Option(help="directory for LANG.pack/ outputs")] = None,
    resident: Annotated[Path | None, typer.Option(help="the resident (math expert) checkpoint")] = None,
    expert: ExpertOption = None,
    bottom: BottomOption = None,
    top: TopOption = None,
    transition: TransitionOption = None,
    transition_weight: WeightOption = None,
    non_layer: NonLayerOption = None,
    config: Annotated[Path | None, typer.Option(help="build.yaml with per-language plans")] = None,
    delta_rank: Annotated[
        int | None, typer.Option(help="delta packs: swapped linears as rank-R factors of their change")
    ] = None,
    delta_energy: Annotated[
        float | None, typer.Option(help="delta packs: per linear the smallest rank keeping this energy")
    ] = None,
    fidelity_prompts: Annotated[
        Path | None,
        typer.Option(help="delta packs: prompts to measure fidelity on (file, or a dir of mgsm_LANG.tsv)"),
    ] = None,
    no_fidelity: Annotated[bool, typer.Option(help="delta packs: skip the fidelity measurement")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Cut a block pack per language expert: DIR/LANG.pack/ (exact, or delta with --delta-*)."""
    from modserve.packs.build import BuildConfig, build_packs, load_build_config, resolve_jobs
    from modserve.packs.fidelity import default_prompts, read_prompts
    from modserve.packs.format import read_manifest
    from modserve.packs.lowrank import RankChoice

    cfg = load_build_config(config) if config else BuildConfig()
    resident = resident or cfg.resident
    out = out or cfg.out
    if resident is None:
        raise ModserveError("--resident: required (or `resident:` in --config)")
    if out is None:
        raise ModserveError("--out: required (or `out:` in --config)")
    cli_plan = plan_flags(
        bottom=bottom, top=top, transition=transition,
        transition_weight=transition_weight, non_layer=non_layer,
    )
    delta = None
    if delta_rank is not None or delta_energy is not None:
        delta = RankChoice(rank=delta_rank, energy=delta_energy)
    elif fidelity_prompts is not None or no_fidelity:
        raise ModserveError("--fidelity-prompts/--no-fidelity: only for delta packs (--delta-rank or --delta-energy)")
    jobs = resolve_jobs(cfg, parse_experts(expert), cli_plan, delta)
    prompts = {}
    if delta is not None and not no_fidelity:
        prompts = {
            job.language: read_prompts(fidelity_prompts, job.language) if fidelity_prompts
            else default_prompts(job.language)
            for job in jobs
        }
    for pack in build_packs(resident, jobs, out, progress=not quiet, fidelity_prompts=prompts):
        typer.echo(f"wrote {pack}")
        if delta is not None:
            print_delta_fit(read_manifest(pack))


def print_delta_fit(manifest) -> None:
    """Per factored tensor its rank, kept energy and ‖Δ − BA‖/‖W_lang‖; then the measured fidelity."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{manifest.language}: delta fit", show_edge=False)
    for column in ("tensor", "rank", "energy", "rel. error"):
        table.add_column(column, justify="left" if column == "tensor" else "right")
    for name, fit in manifest.delta["tensors"].items():
        rank = f"{fit['rank']} (capped at {fit['full_rank']})" if fit["capped"] else str(fit["rank"])
        table.add_row(name, rank, f"{fit['energy']:.4f}", f"{fit['relative_error']:.2e}")
    console = Console()
    console.print(table)
    fidelity = manifest.fidelity
    if fidelity.get("measured"):
        console.print(
            f"{manifest.language}: fidelity vs the exact pack on {fidelity['prompts']} prompts "
            f"({fidelity['tokens']} tokens): KL mean {fidelity['kl_mean']:.2e}, max {fidelity['kl_max']:.2e}, "
            f"top-1 agreement {fidelity['top1_agreement']:.4f}"
        )
    else:
        console.print(f"{manifest.language}: fidelity not measured")


@app.command()
def merge(
    resident: Annotated[Path, typer.Option(help="the resident (math expert) checkpoint")],
    out: Annotated[Path, typer.Option(help="directory for the merged checkpoint")],
    pack: Annotated[Path | None, typer.Option(help="a LANG.pack directory")] = None,
    expert: ExpertOption = None,
    bottom: BottomOption = None,
    top: TopOption = None,
    transition: TransitionOption = None,
    transition_weight: WeightOption = None,
    non_layer: NonLayerOption = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Write resident + one pack (or one expert, via its plan) as a full Hugging Face checkpoint."""
    from modserve.packs.build import BuildConfig, resolve_jobs
    from modserve.packs.merge import merge_expert, merge_pack

    experts = parse_experts(expert)
    if (pack is None) == (not experts) or len(experts) > 1:
        raise ModserveError("merge: give exactly one of --pack PATH or --expert LANG=PATH")
    if pack is not None:
        merge_pack(resident, pack, out, progress=not quiet)
    else:
        cli_plan = plan_flags(
            bottom=bottom, top=top, transition=transition,
            transition_weight=transition_weight, non_layer=non_layer,
        )
        (job,) = resolve_jobs(BuildConfig(), experts, cli_plan)
        merge_expert(resident, job, out, progress=not quiet)
    typer.echo(f"wrote {out}")


@app.command("export-lora")
def export_lora(
    resident: Annotated[Path, typer.Option(help="the resident (math expert) checkpoint the pack was built for")],
    pack: Annotated[Path, typer.Option(help="a LANG.pack directory")],
    rank: Annotated[int, typer.Option(help="LoRA rank (capped at each matrix's own rank)")],
    out: Annotated[Path, typer.Option(help="directory for adapter_config.json and adapter_model.safetensors")],
) -> None:
    """Write a pack as a PEFT LoRA adapter for its resident (norms folded into the linears)."""
    from modserve.packs.lora import export_lora as export

    adapter = export(resident, pack, rank, out)
    for cap in adapter.caps:
        typer.echo(f"rank capped: {cap.module} has rank {cap.full_rank} (asked {cap.asked})")
    typer.echo(f"wrote {adapter.path} (rank {adapter.rank})")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="directory for the demo experts and packs")],
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Write the deterministic demo: tiny base, math and language experts, and their packs."""
    from modserve.demo.builtin import build_demo

    paths = build_demo(out, progress=not quiet)
    typer.echo(f"resident: {paths.resident}")
    for language, pack in paths.packs.items():
        typer.echo(f"pack {language}: {pack}")


# --- online: serve -------------------------------------------------------------------------


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="serve YAML (none: the built-in demo)")] = None,
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
    backend: Annotated[str | None, typer.Option(help="native or vllm")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Serve the OpenAI-compatible API (the built-in demo when no config is given)."""
    from modserve.config import load_serve_config
    from modserve.server.main import serve as run_server

    flags: dict = {}
    for section, name, value in [
        ("server", "host", host), ("server", "port", port), ("engine", "backend", backend),
        ("model", "dtype", dtype), ("model", "device", device),
    ]:
        if value is not None:
            flags.setdefault(section, {})[name] = value
    raise typer.Exit(run_server(load_serve_config(config, flags), log_level))


# --- routing: detect -----------------------------------------------------------------------


@app.command()
def detect(
    text: Annotated[str | None, typer.Argument(help="text to route")] = None,
    file: Annotated[Path | None, typer.Option(help="route each line of this file instead")] = None,
    packs: Annotated[str, typer.Option(help="comma-separated pack languages")] = "sw,te,bn,ja",
    detector: Annotated[str, typer.Option(help="py3langid or langdetect")] = "py3langid",
    candidates: Annotated[str, typer.Option(help="'all' or comma-separated language codes")] = "all",
    min_confidence: Annotated[float, typer.Option(help="below this, the resident serves")] = 0.5,
) -> None:
    """Print the language the router picks for TEXT (or each line of --file) and its confidence."""
    from rich.console import Console
    from rich.table import Table

    from modserve.router import Router

    if (text is None) == (file is None):
        raise ModserveError("detect: give TEXT or --file PATH (one of them)")
    try:
        texts = [text] if text is not None else [t for t in file.read_text().splitlines() if t.strip()]
    except OSError as err:
        raise ModserveError(f"{file}: cannot read ({err.strerror})") from None
    choice = "all" if candidates == "all" else [c.strip() for c in candidates.split(",") if c.strip()]
    router = Router([p.strip() for p in packs.split(",") if p.strip()], detector, choice, min_confidence)
    table = Table("routed", "detected", "confidence", "reason", "µs", "text")
    for line in texts:
        d = router.detect(line)
        snippet = line if len(line) <= 60 else line[:57] + "..."
        table.add_row(d.language, d.detected or "-", f"{d.confidence:.3f}", d.reason, f"{d.seconds * 1e6:.0f}", snippet)
    Console().print(table)


# --- bench ---------------------------------------------------------------------------------


@app.command()
def bench(
    out: Annotated[Path | None, typer.Option(help="write bench.json, bench.md and bench.png here")] = None,
    quick: Annotated[bool, typer.Option(help="tiny model, fewer requests, every scenario: ~7 minutes on 2 cores")] = False,
    mgsm: Annotated[Path | None, typer.Option(help="MGSM directory (mgsm_<lang>.tsv), e.g. data/mgsm; default: built-in prompts")] = None,
    languages: Annotated[str, typer.Option(help="language counts to run, e.g. 1,2,4,8")] = "1,2,4,8",
    mix: Annotated[str, typer.Option(help="uniform or zipf")] = "uniform",
    rate: Annotated[float | None, typer.Option(help="Poisson arrivals per second (default: closed loop)")] = None,
    concurrency: Annotated[int, typer.Option(help="closed-loop concurrency, also the batch size")] = 16,
    requests: Annotated[int, typer.Option(help="requests per scenario")] = 96,
    output_len: Annotated[int, typer.Option(help="tokens generated per request")] = 32,
    model: Annotated[str, typer.Option(help="synthetic model: tiny, small or medium (181M)")] = "small",
    resident: Annotated[Path | None, typer.Option(help="a real resident checkpoint instead")] = None,
    pack: Annotated[list[str] | None, typer.Option(help="LANG=PATH pack for --resident (repeatable)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    backend: Annotated[
        str, typer.Option(help="backends to compare: native, vllm, vllm-grouped, vllm-lora (vLLM with that pack_mode)")
    ] = "native,vllm,vllm-grouped,vllm-lora",
    delta_rank: Annotated[int | None, typer.Option(
        help="rank of the delta packs and LoRA adapters (default: the largest keeping resident + 4 packs "
        "≤ 0.3 of 4 models; with --resident, LoRA at full rank)",
    )] = None,
    repeats: Annotated[int, typer.Option(
        help="passes over every scenario, one after another; rows and ratios report their medians",
    )] = 1,
) -> None:
    """Throughput, latency and memory as languages grow, against the baselines."""
    from modserve.bench.report import markdown, write
    from modserve.bench.suite import BenchOptions, run_suite

    if mix not in ("uniform", "zipf"):
        raise ModserveError(f"--mix: {mix!r} is not uniform or zipf")
    try:
        counts = tuple(int(n) for n in languages.split(","))
    except ValueError:
        raise ModserveError(f"--languages: expected counts like 1,2,4,8, got {languages!r}") from None
    options = BenchOptions(
        out=out, quick=quick, mgsm=mgsm, language_counts=counts, mix=mix, rate=rate,
        concurrency=concurrency, num_requests=requests, output_len=output_len, model=model,
        resident=resident, packs=parse_experts(pack, "--pack"), device=device, dtype=dtype,
        backends=tuple(b.strip() for b in backend.split(",") if b.strip()), delta_rank=delta_rank,
        repeats=repeats,
    )
    report = run_suite(options)
    if out is not None:
        for file in write(report, out):
            typer.echo(f"wrote {file}", err=True)
    typer.echo(markdown(report))


@app.command()
def analyze(
    base: Annotated[Path, typer.Option(help="the base model both experts were fine-tuned from")],
    expert: Annotated[list[str], typer.Option(help="NAME=PATH or PATH of an expert (repeatable)")],
    out: Annotated[Path | None, typer.Option(help="write analysis.csv, analysis.json, heatmap.png here")] = None,
    math: Annotated[str | None, typer.Option(help="which expert is the math expert (default: 'math' or the first)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Per-layer relative change of each expert from the base, and the bottom/top to swap."""
    from rich.console import Console

    from modserve.packs.analyze import analyze as run_analysis
    from modserve.packs.analyze import table, write_outputs

    experts: dict[str, Path] = {}
    for value in expert:
        name, sep, path = value.rpartition("=") if "=" in value else ("", "", value)
        name = name or Path(path).name
        if name in experts:
            raise ModserveError(f"--expert: name {name!r} given twice (use NAME=PATH)")
        experts[name] = Path(path)
    analysis = run_analysis(base, experts, progress=not quiet)
    suggestions = analysis.suggestions(math)
    console = Console()
    console.print(table(analysis))
    if not suggestions:
        console.print("one expert only: give the math expert and a language expert for a bottom/top suggestion")
    for s in suggestions:
        console.print(
            f"{s['language']}: moved more than {s['math']} in the bottom {s['bottom']} and top {s['top']} layers\n"
            f"  modserve build --resident {experts[s['math']]} --expert {s['language']}={experts[s['language']]} "
            f"--bottom {s['bottom']} --top {s['top']} --out packs/"
        )
    if out is not None:
        for file in write_outputs(analysis, out, math):
            typer.echo(f"wrote {file}", err=True)
