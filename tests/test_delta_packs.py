"""Delta packs: low-rank factors of each swapped linear's change, served like exact packs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from modserve.checkpoint import Checkpoint
from modserve.demo.builtin import DEMO_PLAN
from modserve.demo.synthetic import TinySpec, build_family
from modserve.errors import ModserveError, PackError
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.delta import exact_tensors
from modserve.packs.format import ResidentHashes, load_verified_pack, read_manifest
from modserve.packs.lowrank import RankChoice
from modserve.packs.merge import merge_pack
from modserve.packs.plan import Plan
from tests.conftest import MGSM_DIR, MODSERVE
from tests.engine_helpers import chat_ids, greedy
from tests.oracle import hf_greedy
from tests.test_native_engine import started

FULL = RankChoice(rank=100_000)  # capped at every matrix's own rank


def build(resident, experts: dict, out, choice: RankChoice | None, plan=DEMO_PLAN, prompts=None) -> dict:
    jobs = [BuildJob(lang, path, plan, choice) for lang, path in experts.items()]
    packs = build_packs(resident, jobs, out, progress=False, fidelity_prompts=prompts)
    return {path.name.removesuffix(".pack"): path for path in packs}


def mgsm(language: str, count: int = 8) -> list[str]:
    lines = (MGSM_DIR / f"mgsm_{language}.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[0] for line in lines[:count]]


@pytest.fixture(scope="module")
def delta(demo, tmp_path_factory) -> dict:
    """Rank-4 delta packs of the demo's sw and te experts (measured on MGSM), and their merges."""
    root = tmp_path_factory.mktemp("delta")
    experts = {lang: demo.expert(lang) for lang in ("sw", "te")}
    packs = build(demo.resident, experts, root / "packs", RankChoice(rank=4), prompts={"sw": mgsm("sw"), "te": mgsm("te")})
    merges = {lang: merge_pack(demo.resident, pack, root / "merged" / lang, progress=False) for lang, pack in packs.items()}
    return {"packs": packs, "merged": merges}


def test_a_delta_pack_records_its_rank_fit_and_measured_fidelity(delta):
    manifest = read_manifest(delta["packs"]["sw"])
    assert manifest.kind == "delta" and manifest.format == "modserve.pack/2"
    assert manifest.delta["scheme"] == "svd" and manifest.delta["rank"] == 4
    fits = manifest.delta["tensors"]
    assert fits and all(f["rank"] == 4 and not f["capped"] and 0 < f["energy"] <= 1 for f in fits.values())
    assert all(0 <= f["relative_error"] < 1 for f in fits.values())
    assert all(name.endswith("_proj.weight") for name in fits)
    stored = load_file(delta["packs"]["sw"] / "blocks.safetensors")
    for name in fits:
        assert stored[f"{name}.lora_A"].shape[0] == 4 and stored[f"{name}.lora_B"].shape[1] == 4
        assert name not in stored
    assert any(name.endswith("layernorm.weight") for name in stored)  # norms stay whole
    fidelity = manifest.fidelity
    assert fidelity["measured"] and fidelity["prompts"] == 8 and fidelity["tokens"] > 100
    assert 0 <= fidelity["top1_agreement"] <= 1 and fidelity["kl_mean"] >= 0


def test_merging_a_delta_pack_writes_resident_plus_its_factor_product(demo, delta):
    manifest, stored = load_verified_pack(delta["packs"]["te"], ResidentHashes(Checkpoint(demo.resident)))
    merged, resident = Checkpoint(delta["merged"]["te"]), Checkpoint(demo.resident)
    name = next(iter(manifest.delta["tensors"]))
    expected = resident.get(name).float() + stored[f"{name}.lora_B"].float() @ stored[f"{name}.lora_A"].float()
    assert torch.equal(merged.get(name), expected.to(merged.get(name).dtype))
    untouched = next(n for n in resident.names if n not in manifest.replaced)
    assert torch.equal(merged.get(untouched), resident.get(untouched))


async def test_delta_and_exact_packs_serve_side_by_side_each_equal_to_its_merge(demo, merged, delta):
    packs = {**demo.packs, **delta["packs"]}  # sw, te delta; bn, ja exact
    oracle = {**merged, **delta["merged"]}
    engine = await started(demo.resident, packs)
    try:
        asks = [(lang, k) for k in range(3) for lang in ("sw", "te", "bn", "ja", "resident")]
        prompts = {(lang, k): chat_ids(engine, f"{k}: {'swali ' * (2 * k)}{lang}") for lang, k in asks}
        got = await asyncio.gather(*(greedy(engine, f"{lang}-{k}", lang, prompts[lang, k], 16) for lang, k in asks))
    finally:
        await engine.shutdown()
    for (lang, k), tokens in zip(asks, got, strict=True):
        assert tokens == hf_greedy(oracle[lang], prompts[lang, k], 16), (lang, k)


async def test_at_full_rank_a_delta_pack_serves_exactly_like_the_exact_pack(demo, merged, tmp_path):
    packs = build(demo.resident, {"ja": demo.expert("ja")}, tmp_path, FULL, prompts={"ja": mgsm("ja", 4)})
    manifest = read_manifest(packs["ja"])
    assert all(f["capped"] and f["rank"] == f["full_rank"] for f in manifest.delta["tensors"].values())
    assert manifest.fidelity["top1_agreement"] == 1.0 and manifest.fidelity["kl_mean"] < 1e-6
    engine = await started(demo.resident, {**demo.packs, "ja": packs["ja"]})
    try:
        prompts = [chat_ids(engine, f"{k} 12 + 7 = ?") for k in range(3)]
        got = await asyncio.gather(*(greedy(engine, f"r{k}", "ja", p, 16) for k, p in enumerate(prompts)))
    finally:
        await engine.shutdown()
    assert got == [hf_greedy(merged["ja"], p, 16) for p in prompts]


def test_an_energy_target_picks_per_matrix_the_smallest_rank_that_keeps_it(demo, tmp_path):
    packs = build(demo.resident, {"bn": demo.expert("bn")}, tmp_path, RankChoice(energy=0.6))
    manifest = read_manifest(packs["bn"])
    assert manifest.delta["energy"] == 0.6 and manifest.fidelity == {"measured": False}
    resident, expert = Checkpoint(demo.resident), Checkpoint(demo.expert("bn"))
    for name, fit in manifest.delta["tensors"].items():
        assert fit["energy"] >= 0.6
        if manifest.tensors[f"{name}.lora_A"]["source"] == "language":
            s = torch.linalg.svdvals(expert.get(name).float() - resident.get(name).float()).double().pow(2)
            assert float(s[: fit["rank"] - 1].sum() / s.sum()) < 0.6  # one rank fewer would not do


async def test_delta_packs_on_a_model_with_biases_equal_their_merges(tmp_path):
    family = build_family(tmp_path / "qwen", TinySpec(arch="qwen2", num_layers=6, seed=5), ("sw", "te"))
    plan = Plan(bottom=2, top=1, transition=1)
    packs = build(family.math, family.languages, tmp_path / "packs", RankChoice(rank=3), plan)
    assert any(n.endswith("q_proj.bias") for n in read_manifest(packs["sw"]).tensors)
    oracle = {lang: merge_pack(family.math, p, tmp_path / "m" / lang, progress=False) for lang, p in packs.items()}
    oracle["resident"] = family.math
    engine = await started(family.math, packs)
    try:
        asks = ["sw", "te", "resident", "sw"]
        prompts = [chat_ids(engine, f"{k} {lang}") for k, lang in enumerate(asks)]
        got = await asyncio.gather(*(greedy(engine, f"q{k}", lang, p, 12) for k, (lang, p) in enumerate(zip(asks, prompts, strict=True))))
    finally:
        await engine.shutdown()
    assert got == [hf_greedy(oracle[lang], p, 12) for lang, p in zip(asks, prompts, strict=True)]


def test_a_delta_pack_for_another_resident_is_refused(demo, delta, family):
    with pytest.raises(PackError, match="another resident"):
        load_verified_pack(delta["packs"]["sw"], ResidentHashes(Checkpoint(family.math)))


def test_a_corrupted_factor_is_refused(delta, demo, tmp_path):
    copy = tmp_path / "sw.pack"
    shutil.copytree(delta["packs"]["sw"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    name = next(n for n in manifest["tensors"] if n.endswith(".lora_B"))
    manifest["tensors"][name]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="sha256"):
        load_verified_pack(copy, ResidentHashes(Checkpoint(demo.resident)))


def test_exact_tensors_refuses_a_delta_pack_missing_a_factor(delta, demo):
    manifest, stored = load_verified_pack(delta["packs"]["sw"], ResidentHashes(Checkpoint(demo.resident)))
    name = next(iter(manifest.delta["tensors"]))
    del stored[f"{name}.lora_A"]
    with pytest.raises(PackError, match="factors of"):
        exact_tensors(manifest, stored, Checkpoint(demo.resident))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--delta-rank", "0"], "--delta-rank"),
        (["--delta-energy", "0"], "--delta-energy"),
        (["--delta-energy", "1.5"], "--delta-energy"),
        (["--delta-rank", "4", "--delta-energy", "0.9"], "--delta-rank and --delta-energy"),
        (["--no-fidelity"], "--fidelity-prompts/--no-fidelity"),
        (["--delta-rank", "4", "--fidelity-prompts", "missing.txt"], "--fidelity-prompts"),
    ],
)
def test_bad_delta_flags_name_the_flag_and_write_nothing(demo, tmp_path, flags, named):
    out = tmp_path / "out"
    cmd = [*MODSERVE, "build", "--resident", str(demo.resident), "--expert", f"sw={demo.expert('sw')}",
           "--bottom", "2", "--top", "1", "--out", str(out), "--quiet", *flags]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode != 0 and named in result.stderr, result.stderr
    assert not out.exists()


def test_build_cli_prints_each_factored_tensor_and_the_fidelity(demo, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Bata wa Janet hutaga mayai 16 kila siku.\nJe, ni dola ngapi?\n", encoding="utf-8")
    cmd = [*MODSERVE, "build", "--resident", str(demo.resident), "--expert", f"sw={demo.expert('sw')}",
           "--bottom", "2", "--top", "1", "--out", str(tmp_path / "out"), "--quiet",
           "--delta-rank", "100000", "--fidelity-prompts", str(prompts)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.self_attn.q_proj.weight" in result.stdout and "capped at" in result.stdout
    assert "top-1 agreement 1.0000" in result.stdout
    assert read_manifest(tmp_path / "out" / "sw.pack").fidelity["prompts"] == 2


def test_rank_choice_needs_exactly_one_valid_target():
    for bad in ({"rank": 0}, {"energy": 0.0}, {"energy": 1.01}, {}, {"rank": 2, "energy": 0.5}, {"rank": True}):
        with pytest.raises(ModserveError):
            RankChoice(**bad)
