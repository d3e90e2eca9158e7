"""A delta pack's linears inside vLLM's step (`pack_mode: grouped`): Δ ≈ B·A added to the
resident's output, the factors run as linears of the module they change — vLLM's own weight
processing and kernel (oneDNN on CPU: 2-6x faster than F.linear at these shapes).

Two ways to run a step's changes, one module at a time. `LowRankChange` runs one language's
rows alone: a gather, A, B per shard and a scatter-add, for each language in the step.
`EveryLanguageChange` runs every language at once: one A over all languages' factors, each
row's product masked to its own language's ranks, one B per shard — a fixed handful of calls
whatever the mix, but every row multiplies every language's factors. A decode step of a few
dozen rows is bound by the calls and the bytes, which both ways read alike, so it takes the
second; a prefill step is bound by the arithmetic, so it takes the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Up to this many rows in a step, every language's change runs at once (`EveryLanguageChange`).
FEW_ROWS = 64


@dataclass
class StackedDelta:
    """Δ of one vLLM module as B·A per shard (q/k/v, gate/up; one shard elsewhere): the
    shards share their input, so their A factors are stacked into one."""

    a: torch.Tensor  # [sum of the shards' ranks, in]
    b: list[torch.Tensor]  # per shard: [out_s, rank_s]
    bias: torch.Tensor | None = None  # the change of the module's bias, if any

    @property
    def shape(self) -> tuple[int, int]:
        return sum(b.shape[0] for b in self.b), self.a.shape[1]

    @property
    def ranks(self) -> list[int]:
        return [b.shape[1] for b in self.b]

    def to(self, device, dtype) -> StackedDelta:
        on = {"device": device, "dtype": dtype}
        bias = None if self.bias is None else self.bias.to(**on)
        return StackedDelta(self.a.to(**on), [b.to(**on) for b in self.b], bias)


class FactorLinear(nn.Module):
    """One factor run as a linear of the module it changes, processed as vLLM processes that
    module's loaded weight."""

    def __init__(self, base: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.shape = tuple(weight.shape)  # [out, in]; vLLM's processing may keep only a packed copy
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self._method = base.quant_method
        self._method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._method.apply(self, x)


def shard_changes(bs: list[FactorLinear], z: torch.Tensor) -> list[torch.Tensor]:
    """Each shard's B on its own columns of z (a block-diagonal B would multiply its zeros too).
    Factors are called via forward, not __call__: no hooks to run, and a step makes hundreds."""
    changes, start = [], 0
    for b in bs:
        changes.append(b.forward(z[:, start : start + b.shape[1]]))
        start += b.shape[1]
    return changes


class LowRankChange(nn.Module):
    """Adds Δ·x + Δbias for the rows of one language."""

    def __init__(self, base: nn.Module, delta: StackedDelta):
        super().__init__()
        self._a = FactorLinear(base, delta.a)
        self._b = [FactorLinear(base, b) for b in delta.b]
        self._bias = delta.bias

    def add_to(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """y[rows] += Δ·x[rows] + Δbias (every row where `rows` is None). The shards' changes are
        joined before a scatter: index_add_ into a strided column slice is several times slower."""
        changes = shard_changes(self._b, self._a.forward(x if rows is None else x.index_select(0, rows)))
        change = changes[0] if len(changes) == 1 else torch.cat(changes, dim=1)
        if self._bias is not None:
            change += self._bias
        if rows is None:
            y += change
        else:
            y.index_add_(0, rows, change)


class EveryLanguageChange(nn.Module):
    """Every language's Δ of one module in one pass. A's rows are ordered shard by shard and,
    within a shard, language by language, so each shard's B over all languages is one matrix
    (its languages' B side by side) fed by one slice of A·x."""

    def __init__(self, base: nn.Module, deltas: dict[int, StackedDelta], groups: int):
        super().__init__()
        order = sorted(deltas)
        sample = deltas[order[0]]
        a_rows, column_groups, bs = [], [], []
        for shard in range(len(sample.b)):
            for g in order:
                start, rank = sum(deltas[g].ranks[:shard]), deltas[g].ranks[shard]
                a_rows.append(deltas[g].a[start : start + rank])
                column_groups += [g] * rank
            bs.append(torch.cat([deltas[g].b[shard] for g in order], dim=1))
        self._a = FactorLinear(base, torch.cat(a_rows))
        self._b = [FactorLinear(base, b) for b in bs]
        self._column_groups = torch.tensor(column_groups, device=sample.a.device)
        self._biases = None  # [group, out]: each group's bias change, zero for the others
        if any(d.bias is not None for d in deltas.values()):
            self._biases = sample.a.new_zeros((groups, sample.shape[0]))
            for g, d in deltas.items():
                if d.bias is not None:
                    self._biases[g] = d.bias

    def add_to(self, y: torch.Tensor, x: torch.Tensor, row_groups: torch.Tensor) -> None:
        """y += each row's own group's Δ·x + Δbias; `row_groups`: each row's group (a row of a
        group with no Δ here gets none)."""
        z = self._a.forward(x)
        z.mul_(row_groups[:, None] == self._column_groups)
        start = 0
        for change in shard_changes(self._b, z):  # a few rows: added in place, column slice by slice
            y[:, start : start + change.shape[1]] += change
            start += change.shape[1]
        if self._biases is not None:
            y += self._biases.index_select(0, row_groups)
