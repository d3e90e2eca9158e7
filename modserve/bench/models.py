"""The bench's models: a trained synthetic family (or real checkpoints), its exact and delta
packs, and one merged checkpoint per language (the ceiling and the N-models baseline)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from modserve.bench import run
from modserve.bench.workloads import BENCH_LANGUAGES
from modserve.demo.finetune import HELD_OUT, Recipe, read_questions, train_family
from modserve.demo.synthetic import TinySpec, hf_config
from modserve.errors import ModserveError
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.delta import is_factored
from modserve.packs.fidelity import REPOSITORY_MGSM
from modserve.packs.format import read_manifest
from modserve.packs.lowrank import RankChoice
from modserve.packs.merge import merge_pack
from modserve.packs.plan import FROM_RESIDENT, Plan

# Synthetic models: the paper's proportions (5 bottom, 2 top, 1 transition of 32 layers).
# planted_bottom/planted_top: the layers the language experts train, the layers each plan
# takes (transitions included); the math expert trains the rest.
SPECS = {
    "tiny": TinySpec(num_layers=12, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=704, seed=11),
    "small": TinySpec(num_layers=16, hidden_size=512, num_heads=8, num_kv_heads=4, intermediate_size=1408,
                      dtype="bfloat16", planted_bottom=4, seed=11),
    # The 181M Llama: packs are layers 0-2 and 14-15 (2 + 1 blended, 1 blended + 1).
    "medium": TinySpec(num_layers=16, hidden_size=1024, num_heads=16, num_kv_heads=4, intermediate_size=2816,
                       seed=11),
}
PLANS = {
    "tiny": Plan(bottom=2, top=1, transition=1),
    "small": Plan(bottom=3, top=1, transition=1),
    "medium": Plan(bottom=2, top=1, transition=1),
}
# Build time on 2 CPU cores is the limit: tiny trains its base, medium keeps the seeded init as
# its base (a useful 181M base run takes minutes) and gives its experts a few steps on short rows.
RECIPES = {
    "tiny": Recipe(base_steps=48, expert_steps=12),
    "small": Recipe(base_steps=24, expert_steps=6, batch_size=4),
    "medium": Recipe(base_steps=0, expert_steps=2, batch_size=2, score_questions=0),
}
DELTA_MEMORY_BUDGET = 0.3  # resident + 4 delta packs, as a fraction of 4 full models
# Each language's delta pack takes the smallest rank whose teacher-forced top-1 agreement with
# its exact pack reaches this, on held-out MGSM questions (rows no bench model trained on).
DELTA_TOP1_FLOOR = 0.99
FIDELITY_QUESTIONS = 8
SMALLEST_DELTA_RANK = 16


def parameter_shapes(spec: TinySpec) -> dict[str, torch.Size]:
    """Every weight's shape, from the HF config alone (a model on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = hf_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    return {name: p.shape for name, p in model.state_dict().items()}


def pack_parameters(shapes: dict[str, torch.Size], plan: Plan, num_layers: int, rank: int | None) -> int:
    """Numbers a pack holds: replaced tensors whole (rank None), or a delta pack's factors
    r·(out + in) per swapped matrix (r capped at the matrix's rank) and the rest whole."""
    total = 0
    for name, shape in shapes.items():
        if plan.tensor_source(name, num_layers) == FROM_RESIDENT:
            continue
        if rank is not None and is_factored(name, torch.empty(shape, device="meta")):
            total += min(rank, *shape) * sum(shape)
        else:
            total += shape.numel()
    return total


def default_delta_rank(shapes: dict[str, torch.Size], plan: Plan, num_layers: int) -> int:
    """The largest rank (a multiple of 8 where one fits) at which the resident and 4 delta packs
    hold at most DELTA_MEMORY_BUDGET of 4 full models' weights."""
    model = sum(s.numel() for s in shapes.values())
    room = (DELTA_MEMORY_BUDGET * 4 * model - model) / 4
    if pack_parameters(shapes, plan, num_layers, 1) > room:
        raise ModserveError(f"no delta rank keeps 4 packs + the resident under {DELTA_MEMORY_BUDGET} of 4 models")
    low, high = 1, max(min(s) for s in shapes.values() if len(s) == 2)  # pack size grows with the rank
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if pack_parameters(shapes, plan, num_layers, middle) <= room else (low, middle - 1)
    return low - low % 8 if low >= 8 else low


def rank_ladder(cap: int) -> list[int]:
    """The ranks a language's delta pack may take: 16, 32, 64, ... below the memory cap, then the cap."""
    ranks, rank = [], SMALLEST_DELTA_RANK
    while rank < cap:
        ranks.append(rank)
        rank *= 2
    return [*ranks, cap]


def build_delta_packs(
    resident: Path, jobs: list[BuildJob], out: Path, prompts: dict[str, list[str]], ranks: list[int]
) -> dict[str, Path]:
    """Each language's delta pack at the smallest of `ranks` keeping DELTA_TOP1_FLOOR top-1
    agreement with its exact pack on `prompts` (the last rank where none does): fidelity sets
    the rank, and a language whose change a low rank carries holds no more."""
    chosen: dict[str, Path] = {}
    for k, rank in enumerate(ranks):
        left = [replace(job, delta=RankChoice(rank=rank)) for job in jobs if job.language not in chosen]
        for language, pack in by_language(build_packs(resident, left, out / f"rank-{rank}", False, prompts)).items():
            if k == len(ranks) - 1 or read_manifest(pack).fidelity["top1_agreement"] >= DELTA_TOP1_FLOOR:
                chosen[language] = pack
        if len(chosen) == len(jobs):
            break
    return chosen


def prepare(options, workdir: Path) -> tuple[run.Setup, dict]:
    """Resident, exact packs, delta packs (synthetic models: they need the experts), merged checkpoints."""
    delta: dict[str, Path] = {}
    if options.resident is not None:
        resident, packs = options.resident, dict(options.packs)
        if not packs:
            raise ModserveError("--pack: give at least one LANG=PATH with --resident")
        model = {"resident": str(resident), "languages": sorted(packs)}
        # LoRA adapters only (no experts, no delta packs); None: full rank
        model["delta"] = {"rank": {}, "lora_rank": options.delta_rank, "fidelity": {}}
    else:
        spec, plan, recipe = SPECS[options.model], PLANS[options.model], RECIPES[options.model]
        languages = BENCH_LANGUAGES[: max(options.language_counts)]
        started = time.perf_counter()
        trained = train_family(workdir / "experts", spec, languages, recipe)
        trained_seconds = time.perf_counter() - started
        resident = trained.family.math
        jobs = [BuildJob(lang, path, plan) for lang, path in trained.family.languages.items()]
        packs = by_language(build_packs(resident, jobs, workdir / "packs", progress=False))
        cap = default_delta_rank(parameter_shapes(spec), plan, spec.num_layers)
        ranks = [options.delta_rank] if options.delta_rank else rank_ladder(cap)
        held_out = slice(HELD_OUT, HELD_OUT + FIDELITY_QUESTIONS)
        measured_on = {lang: read_questions(REPOSITORY_MGSM, lang, held_out) for lang in languages}
        delta = build_delta_packs(resident, jobs, workdir / "delta-packs", measured_on, ranks)
        manifests = {lang: read_manifest(p) for lang, p in delta.items()}
        chosen = {lang: m.delta["rank"] for lang, m in manifests.items()}
        model = {
            "synthetic": options.model, "spec": spec.__dict__, "plan": plan.to_dict(), "recipe": recipe.__dict__,
            "experts_seconds": trained_seconds, "held_out_top1": trained.held_out_top1,
            "majority_byte_top1": trained.majority_top1,
            "delta": {  # LoRA adapters: one rank for all, the largest a delta pack took
                "rank": chosen, "lora_rank": max(chosen.values()), "ranks_tried": ranks, "top1_floor": DELTA_TOP1_FLOOR,
                "fidelity": {lang: m.fidelity for lang, m in manifests.items()},
            },
        }
    merged = {lang: merge_pack(resident, pack, workdir / "merged" / lang, progress=False) for lang, pack in packs.items()}
    manifest = read_manifest(next(iter(packs.values())))
    model["swapped_layers"] = manifest.layers
    model["num_layers"] = manifest.num_layers
    setup = run.Setup(
        resident=Path(resident), packs=packs, merged=merged, delta_packs=delta, lora_rank=model["delta"]["lora_rank"],
        device=options.device, dtype=options.dtype, max_batch_size=options.concurrency,
        vllm_args=options.vllm_args, max_model_len=2048 if options.mgsm else 512,  # MGSM questions run to 1,663 bytes
    )
    return setup, model


def by_language(packs: list[Path]) -> dict[str, Path]:
    return {p.name.removesuffix(".pack"): p for p in packs}
