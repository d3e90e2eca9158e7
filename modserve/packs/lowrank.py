"""Low-rank factors of a weight difference, by SVD in float32.

Shared by delta packs (`build --delta-rank/--delta-energy`) and LoRA export: Δ ≈ B·A with
B [out, r] and A [r, in], the singular values split evenly between them (B = U·√S,
A = √S·Vᵀ) so neither factor carries the whole scale into a low-precision dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from modserve.errors import ModserveError


@dataclass(frozen=True)
class RankChoice:
    """One rank for every matrix (`rank`), or per matrix the smallest rank keeping `energy`
    of Δ's squared Frobenius norm. A rank above a matrix's own is capped at it."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ModserveError("give exactly one of --delta-rank and --delta-energy")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ModserveError(f"--delta-rank: must be an integer ≥ 1, got {self.rank!r}")
        if self.energy is not None and not 0.0 < float(self.energy) <= 1.0:
            raise ModserveError(f"--delta-energy: must be in (0, 1], got {self.energy!r}")

    def describe(self) -> dict:
        return {"rank": self.rank} if self.rank is not None else {"energy": float(self.energy)}


@dataclass
class Factors:
    b: Tensor  # [out, r] float32
    a: Tensor  # [r, in] float32
    rank: int
    full_rank: int  # min(out, in): the rank asked for is capped here
    capped: bool  # the rank asked for exceeded full_rank
    energy: float  # fraction of ‖Δ‖² the factors keep
    residual_norm: float  # ‖Δ − B·A‖_F

    def product(self) -> Tensor:
        return self.b @ self.a


def factorize(delta: Tensor, choice: RankChoice) -> Factors:
    """Truncated SVD of a 2-D Δ (computed in float32 whatever Δ's dtype)."""
    if delta.dim() != 2:
        raise ModserveError(f"low-rank factors need a matrix, got shape {list(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    full_rank = s.numel()
    power = s.double().pow(2)
    total = float(power.sum())
    if choice.rank is not None:
        rank = min(choice.rank, full_rank)
        capped = choice.rank > full_rank
    else:
        kept = power.cumsum(0) / total if total > 0 else torch.ones_like(power)
        rank = min(int((kept < float(choice.energy) - 1e-12).sum()) + 1, full_rank)
        capped = False
    root = s[:rank].sqrt()
    energy = float(power[:rank].sum()) / total if total > 0 else 1.0
    residual = float(power[rank:].sum()) ** 0.5
    return Factors(
        b=(u[:, :rank] * root).contiguous(),
        a=(root[:, None] * vh[:rank]).contiguous(),
        rank=rank, full_rank=full_rank, capped=capped, energy=energy, residual_norm=residual,
    )
