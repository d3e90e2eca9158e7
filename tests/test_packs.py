"""build and merge: packs hold exactly what the plan says; merged checkpoints are the oracle."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modserve.checkpoint import Checkpoint
from modserve.demo.synthetic import TinySpec, base_weights, build_family, write_checkpoint
from modserve.errors import CheckpointError, PackError, PlanError
from modserve.packs.build import BuildJob, build_packs, load_build_config, resolve_jobs
from modserve.packs.format import load_pack, read_manifest
from modserve.packs.merge import merge_expert, merge_pack
from modserve.packs.plan import Plan
from tests.conftest import MODSERVE


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.names}


def expected_pack(resident: dict, expert: dict, num_layers: int, plan: Plan) -> dict:
    """The plan, spelled out independently of modserve.packs.plan."""
    b, u, t, w = plan.bottom, plan.top, plan.transition, plan.transition_weight
    language_layers = set(range(b)) | set(range(num_layers - u, num_layers))
    blend_layers = set(range(b, b + t)) | set(range(num_layers - u - t, num_layers - u))
    out = {}
    for name, r in resident.items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if layer in language_layers:
                out[name] = expert[name]
            elif layer in blend_layers:
                out[name] = (w * expert[name].float() + (1 - w) * r.float()).to(r.dtype)
        elif plan.non_layer == "language":
            out[name] = expert[name]
        elif plan.non_layer != "resident":
            nw = float(plan.non_layer)
            out[name] = (nw * expert[name].float() + (1 - nw) * r.float()).to(r.dtype)
    return out


@pytest.mark.parametrize(
    "plan",
    [
        Plan(bottom=3, top=2, transition=1, transition_weight=0.3),
        Plan(bottom=2, top=1, transition=2, transition_weight=0.75, non_layer="language"),
        Plan(bottom=4, top=3, transition=0, non_layer=0.25),
    ],
    ids=["resident-outer", "language-outer", "blended-outer"],
)
def test_pack_holds_exactly_the_planned_tensors(family, tmp_path, plan):
    (pack,) = build_packs(family.math, [BuildJob("sw", family.languages["sw"], plan)], tmp_path, progress=False)
    got = load_file(pack / "blocks.safetensors")
    want = expected_pack(all_tensors(family.math), all_tensors(family.languages["sw"]), 12, plan)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_manifest_records_plan_layers_and_fingerprints(family, tmp_path):
    plan = Plan(bottom=3, top=2)
    (pack,) = build_packs(family.math, [BuildJob("te", family.languages["te"], plan)], tmp_path, progress=False)
    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["format"] == "modserve.pack/2" and manifest["kind"] == "exact"
    assert manifest["language"] == "te"
    assert manifest["plan"] == plan.to_dict()
    assert manifest["layers"] == [0, 1, 2, 3, 9, 10, 11]
    assert manifest["dtype"] == "float32"
    assert manifest["resident"]["architecture"] == "LlamaForCausalLM"
    assert manifest["resident"]["content_sha256"] != manifest["expert"]["content_sha256"]
    assert manifest["modserve_version"]
    assert {e["source"] for e in manifest["tensors"].values()} == {"language", "blend"}


def test_bf16_blends_are_computed_in_float32(tmp_path):
    fam = build_family(tmp_path / "fam", TinySpec(dtype="bfloat16", num_layers=8), ("sw",))
    plan = Plan(bottom=2, top=2, transition=1, transition_weight=0.3)
    (pack,) = build_packs(fam.math, [BuildJob("sw", fam.languages["sw"], plan)], tmp_path / "out", progress=False)
    got = load_file(pack / "blocks.safetensors")
    want = expected_pack(all_tensors(fam.math), all_tensors(fam.languages["sw"]), 8, plan)
    assert all(torch.equal(got[n], want[n]) and got[n].dtype == torch.bfloat16 for n in want)


def hand_merged_logits(resident: Path, pack_tensors: dict, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resident, dtype=torch.float32)
    state = model.state_dict()
    for name, tensor in pack_tensors.items():
        state[name] = tensor
    model.load_state_dict(state)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model(ids).logits


@pytest.mark.parametrize(
    "spec",
    [TinySpec(), TinySpec(shards=3), TinySpec(tie_embeddings=True), TinySpec(arch="qwen2", shards=2)],
    ids=["single", "sharded", "tied", "qwen2-sharded"],
)
def test_merged_checkpoint_equals_resident_overlaid_with_pack(tmp_path, spec):
    from transformers import AutoModelForCausalLM

    fam = build_family(tmp_path / "fam", spec, ("sw",))
    plan = Plan(bottom=3, top=2, non_layer="language" if spec.tie_embeddings else "resident")
    (pack,) = build_packs(fam.math, [BuildJob("sw", fam.languages["sw"], plan)], tmp_path / "packs", progress=False)
    merged = merge_pack(fam.math, pack, tmp_path / "merged", progress=False)

    resident_ckpt, merged_ckpt = Checkpoint(fam.math), Checkpoint(merged)
    assert merged_ckpt.shard_of == resident_ckpt.shard_of  # sharded like the resident
    _, pack_tensors = load_pack(pack)
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 44, 32, 50, 43, 50]])
    got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    want = hand_merged_logits(fam.math, pack_tensors, ids)
    assert torch.equal(got, want)
    for name in resident_ckpt.names:
        source = pack_tensors.get(name, resident_ckpt.get(name))
        assert torch.equal(merged_ckpt.get(name), source), name


def test_merge_in_one_step_equals_build_then_merge(family, tmp_path):
    plan = Plan(bottom=2, top=2, transition=1, transition_weight=0.6)
    job = BuildJob("sw", family.languages["sw"], plan)
    (pack,) = build_packs(family.math, [job], tmp_path / "packs", progress=False)
    two_step = all_tensors(merge_pack(family.math, pack, tmp_path / "a", progress=False))
    one_step = all_tensors(merge_expert(family.math, job, tmp_path / "b", progress=False))
    assert two_step.keys() == one_step.keys()
    assert all(torch.equal(two_step[n], one_step[n]) for n in two_step)


def test_build_config_sets_plans_per_language_and_flags_override(family, tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text(
        f"resident: {family.math}\n"
        "plan: {bottom: 2, top: 2}\n"
        "languages:\n"
        f"  sw: {{expert: {family.languages['sw']}, bottom: 4}}\n"
        f"  te: {{expert: {family.languages['te']}}}\n"
    )
    cfg = load_build_config(config)
    jobs = {j.language: j.plan for j in resolve_jobs(cfg, {}, {"transition": 0})}
    assert jobs["sw"] == Plan(bottom=4, top=2, transition=0)
    assert jobs["te"] == Plan(bottom=2, top=2, transition=0)


def test_build_config_names_the_bad_field(tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text("languages:\n  sw: {expert: /x, bottm: 4}\n")
    with pytest.raises(Exception, match=r"build.yaml: languages.sw.bottm"):
        load_build_config(config)


# --- bad input: clear message naming the fault, non-zero exit, nothing half-written --------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MODSERVE, *args], capture_output=True, text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_cli_build_then_merge_round_trip(family, tmp_path):
    built = run_cli("build", "--resident", str(family.math), "--expert", f"sw={family.languages['sw']}",
                    "--bottom", "3", "--top", "2", "--out", str(tmp_path / "packs"), "--quiet")
    assert built.returncode == 0, built.stderr
    merged = run_cli("merge", "--resident", str(family.math), "--pack", str(tmp_path / "packs" / "sw.pack"),
                     "--out", str(tmp_path / "merged"), "--quiet")
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "config.json").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_expert_of_another_architecture_is_refused(family, tmp_path):
    other = build_family(tmp_path / "qwen", TinySpec(arch="qwen2"), ("sw",)).languages["sw"]
    result = run_cli("build", "--resident", str(family.math), "--expert", f"sw={other}", "--out", str(tmp_path / "out"))
    assert_refused(result, str(other), "Qwen2ForCausalLM")
    assert not (tmp_path / "out" / "sw.pack").exists()


def test_expert_with_another_shape_is_refused(family, tmp_path):
    other = build_family(tmp_path / "wide", TinySpec(intermediate_size=320), ("sw",)).languages["sw"]
    result = run_cli("build", "--resident", str(family.math), "--expert", f"sw={other}", "--out", str(tmp_path / "out"))
    assert_refused(result, str(other), "has shape")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_expert_missing_a_tensor_is_refused(family, tmp_path):
    spec = TinySpec()
    weights = base_weights(spec)
    del weights["model.layers.5.mlp.up_proj.weight"]
    broken = write_checkpoint(tmp_path / "broken", spec, weights)
    result = run_cli("build", "--resident", str(family.math), "--expert", f"sw={broken}", "--out", str(tmp_path / "out"))
    assert_refused(result, str(broken), "model.layers.5.mlp.up_proj.weight", "missing")


def test_plan_larger_than_the_model_is_refused(family, tmp_path):
    result = run_cli("build", "--resident", str(family.math), "--expert", f"sw={family.languages['sw']}",
                     "--bottom", "8", "--top", "4", "--out", str(tmp_path / "out"))
    assert_refused(result, "bottom (8)", "top (4)", "12 layers")
    with pytest.raises(PlanError, match="transition_weight"):
        Plan(transition_weight=1.5)
    with pytest.raises(PlanError, match="non_layer"):
        Plan(non_layer="both")


def test_pack_with_a_flipped_byte_is_refused(family, tmp_path):
    (pack,) = build_packs(family.math, [BuildJob("sw", family.languages["sw"], Plan(bottom=3, top=2))],
                          tmp_path / "packs", progress=False)
    blob = bytearray((pack / "blocks.safetensors").read_bytes())
    blob[-100] ^= 0x01
    (pack / "blocks.safetensors").write_bytes(bytes(blob))
    result = run_cli("merge", "--resident", str(family.math), "--pack", str(pack), "--out", str(tmp_path / "merged"))
    assert_refused(result, "blocks.safetensors", "sha256")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(PackError, match="sha256"):
        load_pack(pack)


def test_pack_built_for_another_resident_is_refused(family, tmp_path):
    (pack,) = build_packs(family.math, [BuildJob("sw", family.languages["sw"], Plan(bottom=3, top=2))],
                          tmp_path / "packs", progress=False)
    other_resident = build_family(tmp_path / "other", TinySpec(seed=7), ()).math  # same shapes, other weights
    result = run_cli("merge", "--resident", str(other_resident), "--pack", str(pack), "--out", str(tmp_path / "merged"))
    assert_refused(result, "built for another resident", str(other_resident))
    assert not (tmp_path / "merged").exists()
    deeper = build_family(tmp_path / "deep", TinySpec(num_layers=14), ()).math  # other structure
    with pytest.raises(PackError, match="another resident"):
        merge_pack(deeper, pack, tmp_path / "merged2", progress=False)


def test_pickle_weights_are_never_unpickled(family, tmp_path):
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((family.math / "config.json").read_text())
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    result = run_cli("build", "--resident", str(evil), "--expert", f"sw={family.languages['sw']}", "--out", str(tmp_path / "out"))
    assert_refused(result, "pytorch_model.bin", "never unpickles")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="safetensors"):
        Checkpoint(evil)


def test_corrupt_safetensors_file_is_named(family, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((family.math / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        Checkpoint(broken)


def test_refused_rebuild_keeps_the_previous_pack(family, tmp_path):
    (pack,) = build_packs(family.math, [BuildJob("sw", family.languages["sw"], Plan(bottom=3, top=2))],
                          tmp_path, progress=False)
    before = (pack / "blocks.safetensors").read_bytes()
    spec = TinySpec()
    weights = base_weights(spec)
    weights["model.layers.11.mlp.up_proj.weight"] = torch.zeros(1)
    bad = write_checkpoint(tmp_path / "bad", spec, weights)
    with pytest.raises(CheckpointError):
        build_packs(family.math, [BuildJob("sw", bad, Plan(bottom=3, top=2))], tmp_path, progress=False)
    assert (pack / "blocks.safetensors").read_bytes() == before
    assert read_manifest(pack).language == "sw"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
