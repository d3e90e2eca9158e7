"""A block pack as a PEFT LoRA adapter for its resident, so vLLM, PEFT and LoRAX can serve it.

A LoRA adapter can only add B·A to the resident's linears: it cannot change norms, biases
or anything outside the decoder layers. The pack's RMSNorm weights are therefore folded
into the linears they feed. A Llama block computes `W · (g ⊙ n(x))`, with `n` the
normalisation and `g` the norm weight; the adapter sees the resident's input
`g_R ⊙ n(x)`, so the pack's output `W_L · (g_L ⊙ n(x))` is reached with

    q/k/v (after input_layernorm), gate/up (after post_attention_layernorm):
        Δ = W_L · diag(g_L / g_R) − W_R
    o/down (fed by no norm):
        Δ = W_L − W_R

computed in float32, then factored Δ ≈ B·A by truncated SVD (`packs.lowrank`): exact at
full rank. What cannot be carried exactly is refused, naming the tensor: a bias that
differs from the resident's, a tensor outside the layers (embeddings, final norm,
lm_head), any other layer tensor that differs, and a resident norm weight at or near zero
where the pack's differs (its ratio does not exist).

Transition layers need nothing special. `build.blend` blends every tensor of a blended
layer — the linears and the norm weights alike — and the pack stores those final
tensors (the manifest's `source`/`weight` only say how each was made). A blended layer
serves as `W_P · (g_P ⊙ n(x))` with the pack's own W_P and g_P, exactly the form folded
above, so the fold is exact for blends too. (Blending two folded Δs would not be: the
fold is not linear in the pair (W, g).)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from modserve.checkpoint import Checkpoint, layer_index
from modserve.errors import ModserveError
from modserve.files import atomic_dir
from modserve.packs.delta import exact_tensors
from modserve.packs.format import ResidentHashes, load_verified_pack
from modserve.packs.lowrank import RankChoice, factorize

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the model: its module names gain this prefix
# Each RMSNorm of a Llama-family block and the linears reading its output.
NORM_INPUTS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
UNNORMED_LINEARS = ("self_attn.o_proj", "mlp.down_proj")
LINEARS = (*(m for group in NORM_INPUTS.values() for m in group), *UNNORMED_LINEARS)
NEAR_ZERO = 1e-6  # |g_R| below this times max |g_R| has no usable ratio g_L / g_R


@dataclass(frozen=True)
class Cap:
    """A module whose rank was asked above what its matrix has."""

    module: str
    asked: int
    full_rank: int


@dataclass(frozen=True)
class Adapter:
    """An exported adapter: where it is, its largest rank (vLLM's max_lora_rank must cover
    it), and the modules whose rank was capped."""

    path: Path
    rank: int
    caps: tuple[Cap, ...]


def check_rank(rank: int, flag: str = "--rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ModserveError(f"{flag}: must be an integer ≥ 1, got {rank!r}")
    return rank


def full_rank(resident: Checkpoint) -> int:
    """The largest rank of any layer linear of the resident: at this rank every export is exact."""
    shapes = [resident.shape(n) for n in resident.names if layer_index(n) is not None and is_linear_weight(n)]
    return max(min(shape) for shape in shapes)


def is_linear_weight(name: str) -> bool:
    return any(name.endswith(f".{module}.weight") for module in LINEARS)


def export_lora(resident_path: Path, pack_path: Path, rank: int, out_dir: Path) -> Adapter:
    """Write `pack_path` as a PEFT adapter for `resident_path` in `out_dir` (whole or not at all)."""
    check_rank(rank)
    resident = Checkpoint(resident_path)
    manifest, stored = load_verified_pack(pack_path, ResidentHashes(resident))
    pack = exact_tensors(manifest, stored, resident)  # a delta pack, materialised
    refuse_what_lora_cannot_carry(pack, resident, Path(pack_path))
    weights, ranks, caps = {}, {}, []
    for module, delta in folded_deltas(pack, resident, manifest.layers, Path(pack_path)).items():
        factors = factorize(delta, RankChoice(rank=rank))
        if factors.capped:
            caps.append(Cap(module, rank, factors.full_rank))
        weights[f"{PEFT_PREFIX}{module}.lora_A.weight"] = factors.a.contiguous()
        weights[f"{PEFT_PREFIX}{module}.lora_B.weight"] = factors.b.contiguous()
        ranks[module] = factors.rank
    top = max(ranks.values())
    config = adapter_config(resident.path, ranks, top)
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(weights, tmp / ADAPTER_WEIGHTS, metadata={
            "format": "pt", "modserve_pack": manifest.content_sha256, "language": manifest.language,
        })
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Adapter(Path(out_dir), top, tuple(caps))


def refuse_what_lora_cannot_carry(pack: dict[str, Tensor], resident: Checkpoint, where: Path) -> None:
    """Only linear weights and the norms folded into them may differ from the resident."""
    foldable = {f"{m}.weight" for m in LINEARS} | {f"{norm}.weight" for norm in NORM_INPUTS}
    outside = sorted(name for name in pack if layer_index(name) is None)
    if outside:
        raise ModserveError(
            f"{where}: {', '.join(outside)}: outside the decoder layers; a LoRA adapter cannot "
            "change them (build the pack with non_layer: resident)"
        )
    for name in sorted(pack):
        if name.split(".", 3)[3] in foldable or torch.equal(pack[name], resident.get(name)):
            continue
        kind = "bias" if name.endswith(".bias") else "tensor"
        raise ModserveError(f"{where}: {kind} {name!r} differs from the resident's; a LoRA adapter cannot carry it")


def folded_deltas(pack: dict[str, Tensor], resident: Checkpoint, layers: list[int], where: Path) -> dict[str, Tensor]:
    """Δ per linear module of every swapped layer (float32), norms folded in."""
    def final(name: str) -> Tensor:
        return (pack[name] if name in pack else resident.get(name)).float()

    deltas = {}
    for i in layers:
        prefix = f"model.layers.{i}."
        for norm, modules in NORM_INPUTS.items():
            ratio = norm_ratio(final(prefix + norm + ".weight"), resident.get(prefix + norm + ".weight").float(),
                               where, prefix + norm + ".weight")
            for module in modules:
                name = prefix + module
                deltas[name] = final(name + ".weight") * ratio - resident.get(name + ".weight").float()
        for module in UNNORMED_LINEARS:
            name = prefix + module
            deltas[name] = final(name + ".weight") - resident.get(name + ".weight").float()
    return deltas


def norm_ratio(pack_norm: Tensor, resident_norm: Tensor, where: Path, name: str) -> Tensor:
    """g_L / g_R, 1 where they are equal; refused where g_R is (near) zero and g_L differs."""
    same = pack_norm == resident_norm
    tiny = resident_norm.abs() < NEAR_ZERO * float(resident_norm.abs().max())
    bad = tiny & ~same
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ModserveError(
            f"{where}: {name}[{index}] is {float(resident_norm[index]):.3g} in the resident but "
            f"{float(pack_norm[index]):.3g} in the pack; a norm weight at zero cannot be folded into a LoRA adapter"
        )
    return torch.where(same, torch.ones_like(pack_norm), pack_norm / torch.where(same, 1.0, resident_norm))


def adapter_config(resident: Path, ranks: dict[str, int], top: int) -> dict:
    """PEFT's LoRA config with scaling lora_alpha / r = 1 everywhere: capped modules get their
    own rank and alpha through rank_pattern/alpha_pattern (read by PEFT and vLLM alike)."""
    lower = {module: r for module, r in sorted(ranks.items()) if r != top}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(resident),
        "r": top,
        "lora_alpha": top,
        "rank_pattern": lower,
        "alpha_pattern": dict(lower),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
