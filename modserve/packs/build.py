"""Cut block packs: plan every tensor first, then stream them one at a time.

Like mergekit, the plan is computed from headers alone (names, shapes); only the
tensors the plan takes from the language expert are ever read, one at a time,
so peak memory is the pack plus a tensor, never a whole model. A delta pack is cut
from the same stream: each swapped linear is factored as it passes, and its fidelity
against the exact pack is measured before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm import tqdm

from modserve.checkpoint import Checkpoint, tensor_sha256
from modserve.errors import CheckpointError, ModserveError, PlanError
from modserve.languages import LANGUAGE_CODE, RESIDENT
from modserve.packs.delta import (
    exact_tensors,
    factor_names,
    fit,
    fit_record,
    is_factored,
    stored_factors,
)
from modserve.packs.fidelity import FidelityProbe
from modserve.packs.format import (
    Manifest,
    ResidentHashes,
    content_sha256,
    structure_fingerprint,
    write_pack,
)
from modserve.packs.lowrank import RankChoice
from modserve.packs.plan import FROM_RESIDENT, Plan, Source


@dataclass(frozen=True)
class PackPlan:
    """What one pack will hold: each tensor the plan takes off the resident, and how."""

    language: str
    plan: Plan
    steps: list[tuple[str, Source]]
    delta: RankChoice | None = None  # None: an exact pack


def check_language_code(language: str, field: str = "language") -> str:
    if language == RESIDENT or not LANGUAGE_CODE.match(language):
        raise ModserveError(f"{field}: {language!r} is not a language code (e.g. sw, ja, pt-BR)")
    return language


def check_compatible(resident: Checkpoint, expert: Checkpoint) -> None:
    """An expert must be the resident's architecture with every tensor in the same shape."""
    if expert.architecture != resident.architecture:
        raise CheckpointError(
            f"{expert.path}: architecture {expert.architecture}, but the resident "
            f"{resident.path} is {resident.architecture}"
        )
    if expert.num_layers != resident.num_layers:
        raise CheckpointError(
            f"{expert.path / 'config.json'}: num_hidden_layers is {expert.num_layers}, "
            f"the resident has {resident.num_layers}"
        )
    for name in resident.names:
        if name not in expert.shard_of:
            raise CheckpointError(f"{expert.path}: tensor {name!r} is missing")
        if expert.shape(name) != resident.shape(name):
            raise CheckpointError(
                f"{expert.path}: tensor {name!r} has shape {list(expert.shape(name))}, "
                f"the resident's is {list(resident.shape(name))}"
            )


def plan_pack(
    resident: Checkpoint, expert: Checkpoint, language: str, plan: Plan, delta: RankChoice | None = None
) -> PackPlan:
    check_language_code(language)
    check_compatible(resident, expert)
    plan.check(resident.num_layers)
    sources = ((name, plan.tensor_source(name, resident.num_layers)) for name in resident.names)
    return PackPlan(language, plan, [(name, src) for name, src in sources if src != FROM_RESIDENT], delta)


def blend(resident: torch.Tensor, language: torch.Tensor, source: Source) -> torch.Tensor:
    """w·language + (1−w)·resident in float32, cast to the resident's dtype."""
    if source.kind == "language":
        return language.to(resident.dtype)
    w = source.weight
    return (w * language.float() + (1.0 - w) * resident.float()).to(resident.dtype)


def entry(tensor: torch.Tensor, source: Source, **extra) -> dict:
    return {
        "sha256": tensor_sha256(tensor),
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "source": source.kind,
        "weight": source.weight,
        **extra,
    }


def build_pack(
    pack_plan: PackPlan,
    resident: Checkpoint,
    expert: Checkpoint,
    target: Path,
    resident_hashes: ResidentHashes | None = None,
    progress: bool = True,
    fidelity: tuple[FidelityProbe, list[str]] | None = None,
) -> Path:
    """Stream the planned tensors into `target` (a `<lang>.pack` dir, written atomically).

    A delta pack's fidelity is measured with `fidelity` (a probe and its prompts) when given;
    its manifest says so when not."""
    hashes = resident_hashes or ResidentHashes(resident)
    tensors, entries, expert_hashes, exact, fits = {}, {}, {}, {}, {}
    steps = tqdm(pack_plan.steps, desc=f"{pack_plan.language}.pack", unit="tensor", disable=not progress)
    for name, source in steps:
        base = resident.get(name)
        hashes.of(name, base)
        taken = expert.get(name)
        expert_hashes[name] = tensor_sha256(taken)
        out = blend(base, taken, source).contiguous()
        if pack_plan.delta is None or not is_factored(name, out):
            tensors[name], entries[name] = out, entry(out, source)
            continue
        exact[name] = out
        factors = fit(base, out, pack_plan.delta)
        fits[name] = fit_record(factors, out)
        for stored, factor in zip(factor_names(name), stored_factors(factors, out.dtype), strict=True):
            tensors[stored], entries[stored] = factor, entry(factor, source, factor_of=name)
    if not tensors:
        raise PlanError(f"{pack_plan.language}: the plan swaps nothing (bottom=top=0, non_layer resident)")
    manifest = Manifest(
        language=pack_plan.language,
        plan=pack_plan.plan,
        num_layers=resident.num_layers,
        dtype=next(iter(entries.values()))["dtype"],
        tensors=entries,
        resident={},
        expert={
            **structure_fingerprint(expert),
            "content_sha256": content_sha256(expert_hashes),
            "path": str(expert.path),
        },
    )
    manifest.resident = hashes.fingerprint(manifest.replaced)
    if pack_plan.delta is not None:
        manifest.kind = "delta"
        manifest.delta = {"scheme": "svd", **pack_plan.delta.describe(), "tensors": fits}
        manifest.fidelity = {"measured": False}
        if fidelity is not None:
            probe, prompts = fidelity
            approx = {n: t for n, t in exact_tensors(manifest, tensors, resident).items() if n in exact}
            manifest.fidelity = probe.measure(exact, approx, prompts)
    return write_pack(target, manifest, tensors)


# --- build.yaml -------------------------------------------------------------------------


class PlanFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bottom: int | None = None
    top: int | None = None
    transition: int | None = None
    transition_weight: float | None = None
    non_layer: str | float | None = None

    def set_fields(self) -> dict:
        """Only the plan fields given, so unset ones fall through to the next level."""
        plan_fields = PlanFields.model_fields
        return {k: v for k, v in self.model_dump().items() if v is not None and k in plan_fields}


class LanguageEntry(PlanFields):
    expert: Path


class BuildConfig(BaseModel):
    """build.yaml: `resident`, `out`, a global `plan`, and per-language `expert` plus plan fields."""

    model_config = ConfigDict(extra="forbid")
    resident: Path | None = None
    out: Path | None = None
    plan: PlanFields = PlanFields()
    languages: dict[str, LanguageEntry] = {}


def load_build_config(path: Path) -> BuildConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return BuildConfig.model_validate(data)
    except OSError as err:
        raise ModserveError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ModserveError(f"{path}: not valid YAML ({err})") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModserveError(f"{path}: {where}: {first['msg']}") from None


@dataclass(frozen=True)
class BuildJob:
    language: str
    expert: Path
    plan: Plan
    delta: RankChoice | None = None  # None: an exact pack


def resolve_jobs(
    config: BuildConfig, cli_experts: dict[str, Path], cli_plan: dict, delta: RankChoice | None = None
) -> list[BuildJob]:
    """Plan fields, later winning: defaults, config `plan`, config `languages.<lang>`, CLI flags."""
    experts = {lang: entry.expert for lang, entry in config.languages.items()} | cli_experts
    if not experts:
        raise ModserveError("no language expert given (use --expert LANG=PATH or `languages:` in --config)")
    jobs = []
    for language, expert in experts.items():
        fields = config.plan.set_fields()
        if language in config.languages:
            fields |= config.languages[language].set_fields()
        fields |= cli_plan
        try:
            plan = Plan(**fields)
        except PlanError as err:
            raise PlanError(f"plan for {language}: {err}") from None
        jobs.append(BuildJob(check_language_code(language, "--expert"), Path(expert), plan, delta))
    return jobs


def build_packs(
    resident_path: Path,
    jobs: list[BuildJob],
    out_dir: Path,
    progress: bool = True,
    fidelity_prompts: dict[str, list[str]] | None = None,
) -> list[Path]:
    """Plan every language first (so bad input fails before anything is written), then build each.

    Delta packs are measured on `fidelity_prompts[language]` where given."""
    resident = Checkpoint(resident_path)
    experts = [Checkpoint(job.expert) for job in jobs]
    planned = [
        plan_pack(resident, e, j.language, j.plan, j.delta) for j, e in zip(jobs, experts, strict=True)
    ]
    prompts = fidelity_prompts or {}
    measured = {pp.language for pp in planned if pp.delta is not None and prompts.get(pp.language)}
    probe = FidelityProbe(resident) if measured else None
    hashes = ResidentHashes(resident)
    return [
        build_pack(
            pp, resident, expert, Path(out_dir) / f"{pp.language}.pack", hashes, progress,
            (probe, prompts[pp.language]) if pp.language in measured else None,
        )
        for pp, expert in zip(planned, experts, strict=True)
    ]
