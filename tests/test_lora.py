"""`export-lora`: a pack as a PEFT adapter whose model is the merged checkpoint, or a clear refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modserve.demo.synthetic import TinySpec, build_family
from modserve.errors import ModserveError, PackError
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_lora
from modserve.packs.lowrank import RankChoice
from modserve.packs.merge import merge_pack
from modserve.packs.plan import Plan
from tests.test_packs import assert_refused, run_cli

PROMPT = torch.tensor([[256, 72, 101, 108, 108, 111, 44, 32, 50, 43, 50, 61, 32, 52]])
BLENDED = Plan(bottom=3, top=2, transition=1, transition_weight=0.3)


def build(resident: Path, expert: Path, plan: Plan, out: Path) -> Path:
    (pack,) = build_packs(resident, [BuildJob("sw", expert, plan)], out, progress=False)
    return pack


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROMPT).logits[0]


@pytest.fixture(scope="module")
def blended_pack(family, tmp_path_factory) -> Path:
    return build(family.math, family.languages["sw"], BLENDED, tmp_path_factory.mktemp("packs"))


def test_full_rank_adapter_on_peft_is_the_merged_checkpoint(family, blended_pack, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = export_lora(family.math, blended_pack, 128, tmp_path / "adapter")
    merged = merge_pack(family.math, blended_pack, tmp_path / "merged", progress=False)
    resident = AutoModelForCausalLM.from_pretrained(family.math, dtype=torch.float32)
    served = PeftModel.from_pretrained(resident, adapter.path).eval()
    want = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval())
    got = logits(served)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    with served.disable_adapter():  # the adapter is what moves the resident to the merge
        assert (logits(served) - want).abs().max() > 0.1 * want.abs().max()


def test_a_delta_pack_exports_as_the_adapter_of_its_own_merge(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    jobs = [BuildJob("sw", family.languages["sw"], BLENDED, RankChoice(rank=6))]
    (pack,) = build_packs(family.math, jobs, tmp_path / "packs", progress=False)
    adapter = export_lora(family.math, pack, 128, tmp_path / "adapter")
    merged = merge_pack(family.math, pack, tmp_path / "merged", progress=False)
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family.math, dtype=torch.float32), adapter.path)
    want = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval())
    assert (logits(served.eval()) - want).abs().max() < 1e-3 * want.abs().max()


def test_adapter_files_follow_peft(family, blended_pack, tmp_path):
    adapter = export_lora(family.math, blended_pack, 128, tmp_path / "adapter")
    config = json.loads((adapter.path / ADAPTER_CONFIG).read_text())
    weights = load_file(adapter.path / ADAPTER_WEIGHTS)
    swapped = [0, 1, 2, 3, 9, 10, 11]  # 3 bottom + 1 blend, 1 blend + 2 top, of 12
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert config["target_modules"] == sorted(f"model.layers.{i}.{m}" for i in swapped for m in modules)
    assert config["r"] == config["lora_alpha"] == adapter.rank == 128
    assert config["base_model_name_or_path"] == str(family.math)
    # k/v are [64, 128]: their rank is capped at 64, with alpha 64 so the scaling stays 1
    kv = {f"model.layers.{i}.self_attn.{m}": 64 for i in swapped for m in ("k_proj", "v_proj")}
    assert config["rank_pattern"] == config["alpha_pattern"] == kv
    assert {cap.module for cap in adapter.caps} == set(kv)
    assert set(weights) == {
        f"base_model.model.{t}.lora_{ab}.weight" for t in config["target_modules"] for ab in "AB"
    }
    assert weights["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (64, 128)
    assert weights["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (128, 128)


def test_low_rank_adapter_keeps_its_rank(family, blended_pack, tmp_path):
    adapter = export_lora(family.math, blended_pack, 8, tmp_path / "adapter")
    config = json.loads((adapter.path / ADAPTER_CONFIG).read_text())
    weights = load_file(adapter.path / ADAPTER_WEIGHTS)
    assert (config["r"], config["rank_pattern"], adapter.caps) == (8, {}, ())
    assert {w.shape[0] for n, w in weights.items() if "lora_A" in n} == {8}


# --- refusals: the tensor or flag named, no output left ---------------------------------------


def assert_refused_without_output(resident: Path, pack: Path, out: Path, *fragments: str, rank: int = 128) -> None:
    with pytest.raises(ModserveError) as err:
        export_lora(resident, pack, rank, out)
    for fragment in fragments:
        assert fragment in str(err.value), err.value
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())  # no temp dir left


def test_non_layer_tensors_are_refused(family, tmp_path):
    pack = build(family.math, family.languages["sw"], Plan(bottom=2, top=1, non_layer="language"), tmp_path / "p")
    assert_refused_without_output(family.math, pack, tmp_path / "adapter", "model.embed_tokens.weight", "outside")


def test_biases_that_differ_are_refused(tmp_path):
    fam = build_family(tmp_path / "qwen", TinySpec(arch="qwen2", num_layers=4), ("sw",))
    pack = build(fam.math, fam.languages["sw"], Plan(bottom=1, top=1, transition=0), tmp_path / "p")
    assert_refused_without_output(fam.math, pack, tmp_path / "adapter", "bias", "model.layers.0.self_attn.k_proj.bias")


def test_resident_norm_at_zero_is_refused(family, tmp_path):
    resident = tmp_path / "math"
    shutil.copytree(family.math, resident)
    weights = load_file(resident / "model.safetensors")
    weights["model.layers.1.post_attention_layernorm.weight"][5] = 0.0
    save_file(weights, resident / "model.safetensors", metadata={"format": "pt"})
    pack = build(resident, family.languages["sw"], Plan(bottom=2, top=1), tmp_path / "p")
    assert_refused_without_output(resident, pack, tmp_path / "adapter", "model.layers.1.post_attention_layernorm.weight[5]")


def test_pack_for_another_resident_is_refused(family, blended_pack, tmp_path):
    with pytest.raises(PackError, match="another resident"):
        export_lora(family.base, blended_pack, 8, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_cli_names_a_bad_rank_and_a_missing_pack(family, blended_pack, tmp_path):
    out = tmp_path / "adapter"
    bad_rank = run_cli("export-lora", "--resident", str(family.math), "--pack", str(blended_pack),
                       "--rank", "0", "--out", str(out))
    assert_refused(bad_rank, "--rank")
    missing = tmp_path / "nowhere.pack"
    no_pack = run_cli("export-lora", "--resident", str(family.math), "--pack", str(missing),
                      "--rank", "8", "--out", str(out))
    assert_refused(no_pack, str(missing))
    assert not out.exists()


def test_cli_reports_capped_ranks(family, blended_pack, tmp_path):
    result = run_cli("export-lora", "--resident", str(family.math), "--pack", str(blended_pack),
                     "--rank", "100", "--out", str(tmp_path / "adapter"))
    assert result.returncode == 0, result.stderr
    assert "rank capped: model.layers.0.self_attn.k_proj has rank 64 (asked 100)" in result.stdout
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
