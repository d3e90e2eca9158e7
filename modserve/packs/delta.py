"""Delta packs: a swapped linear stored as low-rank factors of W_lang − W_res.

Both experts come from one base, so a language layer is the resident layer plus a
change; a few singular directions of that change carry most of it. Only the 2-D
weights inside swapped layers are factored: norms and biases are vectors and stay
whole, as do embeddings and lm_head (non-layer tensors), so a delta pack is exact
wherever it is cheap to be.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from modserve.checkpoint import Checkpoint, layer_index
from modserve.errors import PackError
from modserve.packs.format import Manifest
from modserve.packs.lowrank import Factors, RankChoice, factorize

FACTOR_A, FACTOR_B = "lora_A", "lora_B"  # [r, in] and [out, r]: Δ ≈ B·A


def is_factored(name: str, tensor: Tensor) -> bool:
    """Whether a delta pack stores this replaced tensor as factors: a layer's weight matrix."""
    return layer_index(name) is not None and tensor.dim() == 2


def factor_names(name: str) -> tuple[str, str]:
    return f"{name}.{FACTOR_A}", f"{name}.{FACTOR_B}"


def fit(resident: Tensor, exact: Tensor, choice: RankChoice) -> Factors:
    """Factors of exact − resident, and how well they fit (relative to ‖W_lang‖)."""
    return factorize(exact.float() - resident.float(), choice)


def fit_record(factors: Factors, exact: Tensor) -> dict:
    norm = float(exact.float().norm())
    return {
        "rank": factors.rank,
        "full_rank": factors.full_rank,
        "capped": factors.capped,
        "energy": round(factors.energy, 6),
        "relative_error": factors.residual_norm / norm if norm else 0.0,
    }


def stored_parts(manifest: Manifest, tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """A pack's replaced tensors as stored: those kept whole, and for each factored one its
    (A, B) with Δ ≈ B·A (a delta pack's layer weights; none in an exact pack)."""
    if manifest.kind == "exact":
        return dict(tensors), {}
    whole: dict[str, Tensor] = {}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for name in manifest.replaced:
        if name in tensors:
            whole[name] = tensors[name]
            continue
        a_name, b_name = factor_names(name)
        if a_name not in tensors or b_name not in tensors:
            raise PackError(f"delta pack for {manifest.language}: factors of {name!r} missing")
        factors[name] = (tensors[a_name], tensors[b_name])
    return whole, factors


def exact_tensors(manifest: Manifest, tensors: Mapping[str, Tensor], resident: Checkpoint) -> dict[str, Tensor]:
    """Any pack's tensors as whole HF-named tensors: a delta pack's factored linears become
    W_res + B·A (in float32, cast to the resident's dtype), the rest are returned as stored.
    This is what `merge` writes and what an engine without a delta path loads."""
    whole, factors = stored_parts(manifest, tensors)
    for name, (a, b) in factors.items():
        base = resident.get(name)
        product = b.float() @ a.float()
        if product.shape != base.shape:
            raise PackError(
                f"delta pack for {manifest.language}: factors of {name!r} give shape "
                f"{list(product.shape)}, the resident's is {list(base.shape)}"
            )
        whole[name] = (base.float() + product).to(base.dtype)
    return whole


def stored_factors(factors: Factors, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return factors.a.to(dtype).contiguous(), factors.b.to(dtype).contiguous()
