"""The native forward against transformers: logits, prefill + decode through the KV cache,
mixed language groups, KVCache.move and config validation. Tiny models, CPU, seconds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from modserve.checkpoint import Checkpoint
from modserve.demo.synthetic import (
    TinySpec,
    base_weights,
    build_family,
    hf_config,
    write_checkpoint,
)
from modserve.engine.native.cache import KVCache
from modserve.engine.native.config import model_args
from modserve.engine.native.model import Group, Transformer
from modserve.engine.native.weights import from_checkpoint, layer_weights, outer_weights
from modserve.errors import ModserveError

L = 4  # layers of every tiny model here
CASES = {
    "llama": TinySpec(num_layers=L, num_kv_heads=4),  # plain multi-head attention
    "llama3_rope": TinySpec(
        num_layers=L, llama3_rope_scaling=True
    ),  # original_max_position_embeddings=64
    "tied": TinySpec(num_layers=L, tie_embeddings=True),
    "qwen2": TinySpec(num_layers=L, arch="qwen2"),  # q/k/v biases
    "mistral": TinySpec(num_layers=L, arch="mistral"),
    "gqa": TinySpec(num_layers=L, num_heads=4, num_kv_heads=1),
    "llama_bias": TinySpec(num_layers=L, attention_bias=True),  # q/k/v/o biases
    "sharded_bf16": TinySpec(num_layers=L, shards=3, dtype="bfloat16"),
}
TOL = {
    torch.float32: 1e-4,
    torch.float16: 0.05,
    torch.bfloat16: 0.25,
}  # absolute; logits are ~10-100
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() else []
)  # run on a GPU where there is one
T_LONG = 80  # > 64 = original_max_position_embeddings of the llama3 case, so the scaling matters


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    built = {}

    def get(case: str):
        if case not in built:
            spec = CASES[case]
            built[case] = write_checkpoint(tmp_path_factory.mktemp(case), spec, base_weights(spec))
        return built[case]

    return get


def _hf(path, dtype, device="cpu"):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(ckpt_path, case, dtype, device):
    path = ckpt_path(case)
    hf, ours = (
        _hf(path, dtype, device),
        from_checkpoint(Checkpoint(path), device, dtype),
    )
    tokens = torch.randint(0, 256, (2, T_LONG), generator=torch.Generator().manual_seed(1)).to(
        device
    )
    ref = _hf_logits(hf, tokens)

    full = ours.logits_all(tokens)
    assert full.dtype == torch.float32 and full.shape == ref.shape
    diff = (full - ref).abs().max().item()
    print(
        f"{case} {dtype} {device}: logits_all max |diff| {diff:.3g} (max |logit| {ref.abs().max().item():.3g})"
    )
    assert diff <= TOL[dtype]

    cache = KVCache(ours.args, num_slots=3, max_len=96, device=device, dtype=dtype)
    last = ours.prefill(tokens.flatten(), [0, 0], [T_LONG, T_LONG], [2, 0], cache, [Group(0, 2)]).logits
    assert (last - ref[:, -1]).abs().max().item() <= TOL[dtype]

    if case == "llama3_rope":  # the check has teeth: without the llama3 scaling the logits move
        plain = Transformer(
            dataclasses.replace(ours.args, rope_scaling=None),
            ours.layers,
            ours.outer,
            device,
            dtype,
        )
        assert (plain.logits_all(tokens) - ref).abs().max().item() > 1.0


def _greedy_prefill_decode(
    model: Transformer, prompts: list[list[int]], steps: int, slots: list[int], groups=None, chunks=None
):
    """Prefill right-padded prompts into `slots`, compact to slots [0, B), decode greedily.

    With `chunks`, row b is prefilled chunks[b] tokens per call, rows leaving as they finish.
    Returns per row the full token sequence and the logits of every step ([steps + 1, V])."""
    B, T, dev = len(prompts), max(map(len, prompts)), model.device
    groups = groups or [Group(0, B)]
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    cache = KVCache(model.args, num_slots=B + 1, max_len=T + steps, device=dev, dtype=model.dtype)
    chunks = chunks or [T] * B
    done, last = [0] * B, [None] * B
    while rows := [b for b in range(B) if done[b] < len(prompts[b])]:
        sizes = [min(chunks[b], len(prompts[b]) - done[b]) for b in rows]
        tokens = [t for b, size in zip(rows, sizes, strict=True) for t in prompts[b][done[b] : done[b] + size]]
        out = model.prefill(
            torch.tensor(tokens, device=dev),
            [done[b] for b in rows],
            sizes,
            [slots[b] for b in rows],
            cache,
            groups if len(rows) == B else [Group(0, len(rows))],
        ).logits
        for row, (b, size) in enumerate(zip(rows, sizes, strict=True)):
            done[b] += size
            last[b] = out[row]
    logits = [torch.stack(last)]
    cache.move(slots, list(range(B)), T)  # a permutation with overlapping src/dst
    seqs = [list(p) for p in prompts]
    positions = lengths.clone()
    for _ in range(steps):
        nxt = logits[-1].argmax(-1)
        for b in range(B):
            seqs[b].append(int(nxt[b]))
        logits.append(model.decode(nxt, positions, cache, groups))
        positions += 1
    return seqs, torch.stack(logits, dim=1).cpu()  # [B, steps + 1, V]


@pytest.mark.parametrize(
    "case,dtype",
    [
        ("llama", torch.float32),
        ("llama3_rope", torch.float32),
        ("qwen2", torch.float32),
        ("gqa", torch.float32),
        ("llama3_rope", torch.bfloat16),
    ],
    ids=["llama", "llama3_rope", "qwen2", "gqa", "llama3_rope-bf16"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_then_decode_matches_transformers(ckpt_path, case, dtype, device):
    path = ckpt_path(case)
    hf, ours = (
        _hf(path, dtype, device),
        from_checkpoint(Checkpoint(path), device, dtype),
    )
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 70, 33)]
    steps = 5
    seqs, logits = _greedy_prefill_decode(ours, prompts, steps, slots=[2, 0, 1])
    for b, seq in enumerate(seqs):
        ref = _hf_logits(hf, torch.tensor([seq], device=device))[
            0
        ].cpu()  # [len, V]; position p predicts token p + 1
        n = len(prompts[b])
        want = ref[n - 1 : n + steps]  # the prompt's last token, then each decoded token
        diff = (logits[b] - want).abs().max().item()
        print(f"{case} {dtype} {device} row {b}: prefill+decode max |diff| {diff:.3g}")
        assert diff <= TOL[dtype]


@pytest.mark.parametrize("case", ["llama3_rope", "gqa", "qwen2"])
def test_a_prompt_prefilled_in_chunks_continues_like_one_prefilled_at_once(ckpt_path, case):
    """Rows at different offsets in one call: each chunk attends to its slot's cached prefix."""
    ours = from_checkpoint(Checkpoint(ckpt_path(case)), "cpu", torch.float32)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 70, 33)]
    whole_seqs, whole = _greedy_prefill_decode(ours, prompts, 5, slots=[2, 0, 1])
    split_seqs, split = _greedy_prefill_decode(ours, prompts, 5, slots=[2, 0, 1], chunks=[2, 16, 9])
    assert split_seqs == whole_seqs
    assert (split - whole).abs().max().item() <= TOL[torch.float32]


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    return build_family(
        tmp_path_factory.mktemp("fam"),
        TinySpec(num_layers=L, planted_bottom=2, planted_top=1),
        ("sw",),
    )


SWAPPED = (0, 1, L - 1)


class WeightReads(TorchDispatchMode):
    """Every matrix product the forward runs, as (weight read, activation rows): what a
    memory-bound step costs, observed from outside the model."""

    OPERANDS = {  # op -> positions of (activation, weight)
        torch.ops.aten.linear.default: (0, 1),
        torch.ops.aten.mm.default: (0, 1),
        torch.ops.aten.addmm.default: (1, 2),
    }

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPERANDS:
            x, w = (args[i] for i in self.OPERANDS[func])
            self.reads.append((w.untyped_storage().data_ptr(), x.numel() // x.shape[-1]))
        return func(*args, **(kwargs or {}))

    def rows(self, weight: torch.Tensor) -> list[int]:
        ptr = weight.untyped_storage().data_ptr()
        return [rows for read, rows in self.reads if read == ptr]


@pytest.mark.parametrize("with_outer", [False, True], ids=["layers", "layers+outer"])
def test_mixed_groups_equal_merged_models_reading_shared_layers_once(tiny_family, tmp_path, with_outer):
    resident = from_checkpoint(Checkpoint(tiny_family.math), "cpu", torch.float32)
    lang = from_checkpoint(Checkpoint(tiny_family.languages["sw"]), "cpu", torch.float32)
    overrides = {i: lang.layers[i] for i in SWAPPED}
    outer = lang.outer if with_outer else None
    merged_layers = [overrides.get(i, w) for i, w in enumerate(resident.layers)]
    merged = Transformer(resident.args, merged_layers, outer or resident.outer, "cpu", torch.float32)

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 4, 12, 7, 10)]
    groups = [Group(0, 2), Group(2, 4, overrides, outer), Group(4, 5)]
    with WeightReads() as watched:
        seqs, logits = _greedy_prefill_decode(resident, prompts, steps=4, slots=[4, 3, 2, 1, 0], groups=groups)
    for i in range(L):  # prefill reads 42 token rows (no padding), then 4 decode steps of 5 rows
        if i in SWAPPED:  # once per run of rows on the same weights
            assert watched.rows(resident.layers[i].wq) == [13, 10] + [2, 1] * 4
            assert watched.rows(lang.layers[i].wq) == [19] + [2] * 4
        else:  # shared: once over the whole batch
            assert watched.rows(resident.layers[i].wq) == [42] + [5] * 4
            assert watched.rows(lang.layers[i].wq) == []

    for b, seq in enumerate(seqs):
        alone = (merged if 2 <= b < 4 else resident).logits_all(torch.tensor([seq]))[0]
        n = len(prompts[b])
        diff = (logits[b] - alone[n - 1 : n + 4]).abs().max().item()
        assert diff <= 1e-4, (b, diff)
    # swapped rows really differ from the resident
    assert (logits[2] - resident.logits_all(torch.tensor([seqs[2]]))[0][len(prompts[2]) - 1 :]).abs().max() > 1

    # the merged model is what transformers computes on the merged checkpoint (the oracle)
    math, sw = Checkpoint(tiny_family.math), Checkpoint(tiny_family.languages["sw"])
    swapped_names = {f"model.layers.{i}." for i in SWAPPED}
    weights = {}
    for name in math.names:
        from_lang = any(name.startswith(p) for p in swapped_names) or (with_outer and "layers" not in name)
        weights[name] = (sw if from_lang else math).get(name)
    path = write_checkpoint(tmp_path / "merged", TinySpec(num_layers=L), weights)
    ref = _hf_logits(_hf(path, torch.float32), torch.tensor([seqs[2]]))[0]
    assert (logits[2] - ref[len(prompts[2]) - 1 :]).abs().max().item() <= 1e-4


def test_adjacent_groups_on_the_same_weights_run_together(tiny_family):
    resident = from_checkpoint(Checkpoint(tiny_family.math), "cpu", torch.float32)
    lang = from_checkpoint(Checkpoint(tiny_family.languages["sw"]), "cpu", torch.float32)
    overrides = {i: lang.layers[i] for i in SWAPPED}
    cache = KVCache(resident.args, 4, 16, "cpu", torch.float32)
    tokens = torch.randint(0, 256, (4, 6))
    groups = [Group(0, 1, overrides), Group(1, 3, dict(overrides)), Group(3, 4)]  # same weights, other dicts
    with WeightReads() as watched:
        resident.prefill(tokens.flatten(), [0] * 4, [6] * 4, [0, 1, 2, 3], cache, groups)  # 6 token rows each
    for i in SWAPPED:
        assert watched.rows(lang.layers[i].wq) == [18] and watched.rows(resident.layers[i].wq) == [6]
    assert watched.rows(resident.layers[2].wq) == [24]
    with pytest.raises(ValueError, match="cover"):
        resident.decode(tokens[:, 0], torch.full((4,), 6), cache, [Group(0, 2), Group(3, 4)])


def test_kv_cache_move_permutes_overlapping_slots():
    args = model_args(hf_config(TinySpec(num_layers=2)))
    cache = KVCache(args, num_slots=5, max_len=8, device="cpu", dtype=torch.float32)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape))
    before = [t.clone() for t in (*cache.k, *cache.v)]
    src, dst, length = [0, 1, 2, 4], [1, 2, 0, 3], 5
    cache.move(src, dst, length)
    for old, new in zip(before, (*cache.k, *cache.v), strict=True):
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(new[d, :, :length], old[s, :, :length])
            assert torch.equal(new[d, :, length:], old[d, :, length:])
        assert torch.equal(new[4], old[4])  # a source that is no destination keeps its data
    assert cache.nbytes() == 2 * 2 * 5 * args.n_kv_heads * 8 * args.head_dim * 4
    with pytest.raises(ValueError):
        cache.move([0, 1], [2, 2], 3)


def test_config_parsing_and_refusals(ckpt_path):
    raw = json.loads((ckpt_path("llama3_rope") / "config.json").read_text())
    args = model_args(raw)
    assert (
        args.rope_scaling["rope_type"] == "llama3"
        and args.rope_scaling["original_max_position_embeddings"] == 64
    )
    assert args.rope_theta == 500000.0 and args.head_dim == 32 and args.n_kv_heads == 2
    # transformers-5 style (rope_parameters), as AutoConfig writes it back
    assert (
        model_args(AutoConfig.from_pretrained(ckpt_path("llama3_rope")).to_dict())
        == args
    )
    no_head_dim = {k: v for k, v in raw.items() if k != "head_dim"}
    assert model_args(no_head_dim).head_dim == 128 // 4
    assert model_args(hf_config(CASES["qwen2"])).qkv_bias
    assert model_args(
        {**raw, "rope_scaling": {"type": "linear", "factor": 2.0}}
    ).rope_scaling == {"rope_type": "linear", "factor": 2.0}

    bad = [
        ({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        (
            {
                **raw,
                "rope_scaling": None,
                "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4},
            },
            "rope_parameters.rope_type",
        ),
        ({**raw, "model_type": "gpt2"}, "model_type"),
        ({**hf_config(CASES["mistral"]), "sliding_window": 64}, "sliding_window"),
        (
            {**hf_config(CASES["qwen2"]), "use_sliding_window": True, "sliding_window": 64},
            "use_sliding_window",
        ),
        ({**raw, "hidden_act": "gelu"}, "hidden_act"),
    ]
    for config, field_name in bad:
        with pytest.raises(ModserveError, match=field_name):
            model_args(config)


def test_missing_tensor_is_named(ckpt_path):
    ckpt = Checkpoint(ckpt_path("qwen2"))
    tensors = {n: ckpt.get(n) for n in ckpt.names if n != "model.layers.1.self_attn.k_proj.bias"}
    args = model_args(ckpt.config)
    with pytest.raises(ModserveError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        layer_weights(tensors, 1, "cpu", torch.float32, args)
    layer = layer_weights(tensors, 0, "cpu", torch.bfloat16)
    assert layer.bq is not None and layer.wq.dtype == torch.bfloat16
    assert layer.nbytes() == sum(t.numel() * 2 for t in vars(layer).values() if t is not None)
    del tensors["lm_head.weight"]
    with pytest.raises(ModserveError, match="lm_head.weight"):
        outer_weights(tensors, args, "cpu", torch.float32)
    tied = outer_weights(
        tensors, dataclasses.replace(args, tie_embeddings=True), "cpu", torch.float32
    )
    assert tied.lm_head is tied.embed and tied.nbytes() == tied.embed.nbytes + tied.norm.nbytes
