"""How pack_mode grouped maps a pack's HF tensors onto vLLM's stacked modules (no vLLM needed)."""

from __future__ import annotations

import pytest
from torch import nn

from modserve.engine.vllm.grouped import UnsupportedPackError, by_module


def test_q_k_v_are_stacked_in_vllms_order_and_a_missing_shard_is_named():
    attention = nn.Module()
    attention.qkv_proj, attention.o_proj = nn.Linear(4, 12), nn.Linear(4, 4)
    model = nn.Module()
    model.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    model.attn = attention
    names = ["attn.v_proj.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.o_proj.weight"]
    assert sorted(by_module(model, dict.fromkeys(names))) == [
        ("attn.o_proj", "weight", ["attn.o_proj.weight"]),
        ("attn.qkv_proj", "weight", ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"]),
    ]
    with pytest.raises(UnsupportedPackError, match=r"attn\.k_proj\.weight: missing, and vLLM stacks it with attn\.q_proj"):
        by_module(model, dict.fromkeys(["attn.q_proj.weight", "attn.v_proj.weight"]))
