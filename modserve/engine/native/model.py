"""The native forward: a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) in plain PyTorch.

Written in the manner of gpt-fast's model.py: a dataclass config, weights as plain
tensors, every shape spelled out. Numerics follow transformers' Llama/Mistral/Qwen2
(RMSNorm in float32, rotate_half RoPE on HF's q/k layout, llama3 frequency scaling,
SiLU-gated MLP, scaled_dot_product_attention).

Layer swapping: a batch is split into `Group`s (contiguous rows sharing one
language's weights). For each layer the rows are processed in maximal runs of
groups that use the same `LayerWeights` object (`is` identity), so a layer no
group overrides runs once over the whole batch.

Shapes: B batch rows, T tokens, D dim, H query heads, K kv heads, d head_dim, V vocab.
`prefill`, `decode` and `logits_all` run under torch.inference_mode themselves.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from modserve.engine.native.cache import KVCache
from modserve.errors import ModserveError

ARCHS = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None, {"rope_type": "linear", "factor"} or llama3's five keys
    tie_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    o_bias: bool = False  # Llama's attention_bias=True also puts a bias on o_proj

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelArgs:
        def bad(field_name: str, why: str) -> ModserveError:
            return ModserveError(f"config.json field {field_name!r}: {why}")

        arch = config.get("model_type")
        if arch not in ARCHS:
            raise bad(
                "model_type", f"{arch!r} is not supported (native backend: {', '.join(ARCHS)})"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"{config['hidden_act']!r} is not supported (only silu)")
        if config.get("mlp_bias"):
            raise bad("mlp_bias", "MLP biases are not supported")
        if arch == "mistral" and config.get("sliding_window") is not None:
            if config["sliding_window"] < config.get("max_position_embeddings", 0):
                raise bad(
                    "sliding_window",
                    f"sliding-window attention ({config['sliding_window']}) is not supported",
                )
        if arch == "qwen2" and config.get("use_sliding_window"):
            raise bad("use_sliding_window", "sliding-window attention is not supported")
        if "sliding_attention" in (config.get("layer_types") or []):
            raise bad("layer_types", "sliding-window attention layers are not supported")
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise bad("partial_rotary_factor", "partial RoPE is not supported")

        # transformers 5 writes rope_parameters (theta inside); transformers 4 rope_theta + rope_scaling.
        if isinstance(config.get("rope_parameters"), dict):
            source, rope = "rope_parameters", dict(config["rope_parameters"])
        else:
            source, rope = "rope_scaling", dict(config.get("rope_scaling") or {})
        if rope and not any(k in rope for k in ("rope_type", "type", "rope_theta", "factor")):
            raise bad(source, "per-layer-type RoPE parameters are not supported")
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise bad(f"{source}.partial_rotary_factor", "partial RoPE is not supported")
        max_pos = int(config.get("max_position_embeddings", 2048))
        try:
            if rope_type == "default":
                scaling = None
            elif rope_type == "linear":
                scaling = {"rope_type": "linear", "factor": float(rope["factor"])}
            elif rope_type == "llama3":
                scaling = {
                    "rope_type": "llama3",
                    "factor": float(rope["factor"]),
                    "low_freq_factor": float(rope["low_freq_factor"]),
                    "high_freq_factor": float(rope["high_freq_factor"]),
                    "original_max_position_embeddings": int(
                        rope.get("original_max_position_embeddings", max_pos)
                    ),
                }
            else:
                raise bad(
                    f"{source}.rope_type",
                    f"{rope_type!r} is not supported (default, linear, llama3)",
                )
        except KeyError as err:
            raise bad(f"{source}.{err.args[0]}", f"missing for rope_type {rope_type!r}") from None

        try:
            dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                vocab_size=int(config["vocab_size"]),
                dim=dim,
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                head_dim=int(config.get("head_dim") or dim // n_heads),
                intermediate_size=int(config["intermediate_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2"
                or (arch == "llama" and bool(config.get("attention_bias"))),
                max_position_embeddings=max_pos,
                o_bias=arch == "llama" and bool(config.get("attention_bias")),
            )
        except KeyError as err:
            raise bad(err.args[0], "missing") from None


def _take(tensors: Mapping[str, Tensor], name: str, device, dtype) -> Tensor:
    try:
        tensor = tensors[name]
    except KeyError:
        raise ModserveError(f"tensor {name!r} is missing") from None
    return tensor.to(device=device, dtype=dtype).contiguous()


def _nbytes(*tensors: Tensor | None) -> int:
    unique = {id(t): t for t in tensors if t is not None}
    return sum(t.numel() * t.element_size() for t in unique.values())


@dataclass
class LayerWeights:
    attn_norm: Tensor  # [D]
    wq: Tensor  # [H*d, D]
    wk: Tensor  # [K*d, D]
    wv: Tensor  # [K*d, D]
    wo: Tensor  # [D, H*d]
    bq: Tensor | None  # [H*d]
    bk: Tensor | None  # [K*d]
    bv: Tensor | None  # [K*d]
    ffn_norm: Tensor  # [D]
    w_gate: Tensor  # [I, D]
    w_up: Tensor  # [I, D]
    w_down: Tensor  # [D, I]
    bo: Tensor | None = None  # [D], Llama with attention_bias only

    @classmethod
    def from_hf(
        cls, tensors: Mapping[str, Tensor], layer: int, device, dtype, args: ModelArgs | None = None
    ) -> LayerWeights:
        """Biases are read when present; with `args` they are required exactly where args says."""
        p = f"model.layers.{layer}."

        def get(name: str) -> Tensor:
            return _take(tensors, p + name, device, dtype)

        def bias(name: str, wanted: bool | None) -> Tensor | None:
            if wanted is None:
                wanted = p + name in tensors
            return get(name) if wanted else None

        qkv = None if args is None else args.qkv_bias
        return cls(
            attn_norm=get("input_layernorm.weight"),
            wq=get("self_attn.q_proj.weight"),
            wk=get("self_attn.k_proj.weight"),
            wv=get("self_attn.v_proj.weight"),
            wo=get("self_attn.o_proj.weight"),
            bq=bias("self_attn.q_proj.bias", qkv),
            bk=bias("self_attn.k_proj.bias", qkv),
            bv=bias("self_attn.v_proj.bias", qkv),
            ffn_norm=get("post_attention_layernorm.weight"),
            w_gate=get("mlp.gate_proj.weight"),
            w_up=get("mlp.up_proj.weight"),
            w_down=get("mlp.down_proj.weight"),
            bo=bias("self_attn.o_proj.bias", None if args is None else args.o_bias),
        )

    def nbytes(self) -> int:
        return _nbytes(*vars(self).values())


@dataclass
class OuterWeights:
    embed: Tensor  # [V, D]
    norm: Tensor  # [D]
    lm_head: Tensor  # [V, D]; the same object as embed when tied

    @classmethod
    def from_hf(cls, tensors: Mapping[str, Tensor], args: ModelArgs, device, dtype) -> OuterWeights:
        embed = _take(tensors, "model.embed_tokens.weight", device, dtype)
        norm = _take(tensors, "model.norm.weight", device, dtype)
        lm_head = embed if args.tie_embeddings else _take(tensors, "lm_head.weight", device, dtype)
        return cls(embed=embed, norm=norm, lm_head=lm_head)

    def nbytes(self) -> int:
        return _nbytes(self.embed, self.norm, self.lm_head)


@dataclass
class Group:
    start: int  # rows [start, end)
    end: int
    layers: Mapping[int, LayerWeights] = field(default_factory=dict)  # overrides of swapped layers
    outer: OuterWeights | None = None  # override of embed / final norm / lm_head


class _CheckpointTensors(Mapping):
    """A Checkpoint seen as a lazy name -> tensor mapping (each get reads one tensor)."""

    def __init__(self, ckpt):
        self.ckpt = ckpt

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.ckpt.shard_of:
            raise KeyError(name)
        return self.ckpt.get(name)

    def __contains__(self, name) -> bool:
        return name in self.ckpt.shard_of

    def __iter__(self) -> Iterator[str]:
        return iter(self.ckpt.shard_of)

    def __len__(self) -> int:
        return len(self.ckpt.shard_of)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """[d/2] float32 inverse frequencies, with linear or llama3 scaling as transformers computes them."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = args.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _runs(groups: list[Group], pick: Callable[[Group], object]) -> list[tuple[int, int, object]]:
    """Maximal runs of consecutive groups whose picked weights are the same object."""
    runs: list[tuple[int, int, object]] = []
    for g in groups:
        w = pick(g)
        if runs and runs[-1][2] is w:
            runs[-1] = (runs[-1][0], g.end, w)
        else:
            runs.append((g.start, g.end, w))
    return runs


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# attend(q, k, v, rows) -> o: q [n, H, T, d], k/v [n, K, T, d] (new tokens, RoPE applied) -> o [n, H, T, d]
Attend = Callable[[Tensor, Tensor, Tensor, slice], Tensor]


class Transformer:
    def __init__(
        self, args: ModelArgs, layers: list[LayerWeights], outer: OuterWeights, device, dtype
    ):
        if len(layers) != args.n_layers:
            raise ModserveError(f"{len(layers)} layers given, config has {args.n_layers}")
        self.args, self.layers, self.outer = args, layers, outer
        self.device, self.dtype = torch.device(device), dtype
        self.inv_freq = rope_inv_freq(args).to(self.device)  # [d/2] float32

    @classmethod
    def from_checkpoint(cls, ckpt, device, dtype) -> Transformer:
        """Reads tensor by tensor: each is cast/moved, then its source copy is dropped."""
        return cls.from_tensors(ckpt.config, _CheckpointTensors(ckpt), device, dtype)

    @classmethod
    def from_tensors(cls, config: dict, tensors: Mapping[str, Tensor], device, dtype) -> Transformer:
        """From a Hugging Face config dict and HF-named tensors (e.g. a dequantized GGUF)."""
        args = ModelArgs.from_hf_config(config)
        layers = [
            LayerWeights.from_hf(tensors, i, device, dtype, args) for i in range(args.n_layers)
        ]
        outer = OuterWeights.from_hf(tensors, args, device, dtype)
        return cls(args, layers, outer, device, dtype)

    def nbytes(self) -> int:
        """Resident weights (layers, embeddings, norm, lm_head)."""
        return self.outer.nbytes() + sum(layer.nbytes() for layer in self.layers)

    # ---- building blocks -------------------------------------------------------------------

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, d] in model dtype (float32 math, as HF)."""
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    def _block(
        self, w: LayerWeights, x: Tensor, cos: Tensor, sin: Tensor, rows: slice, attend: Attend
    ) -> Tensor:
        """One decoder layer on x [n, T, D] (batch rows `rows`)."""
        n, T, _ = x.shape
        a = self.args
        H, K, d, eps = a.n_heads, a.n_kv_heads, a.head_dim, a.norm_eps
        h = rms_norm(x, w.attn_norm, eps)
        q = F.linear(h, w.wq, w.bq).view(n, T, H, d).transpose(1, 2)  # [n, H, T, d]
        k = F.linear(h, w.wk, w.bk).view(n, T, K, d).transpose(1, 2)  # [n, K, T, d]
        v = F.linear(h, w.wv, w.bv).view(n, T, K, d).transpose(1, 2)  # [n, K, T, d]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = attend(q, k, v, rows)  # [n, H, T, d]
        x = x + F.linear(o.transpose(1, 2).reshape(n, T, H * d), w.wo, w.bo)
        h = rms_norm(x, w.ffn_norm, eps)
        return x + F.linear(F.silu(F.linear(h, w.w_gate)) * F.linear(h, w.w_up), w.w_down)

    def _outer(self, g: Group) -> OuterWeights:
        return self.outer if g.outer is None else g.outer

    def _forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        groups: list[Group],
        attend: Callable[[int], Attend],
    ) -> Tensor:
        """tokens/positions [B, T] -> final hidden states [B, T, D] (before the final norm)."""
        B = tokens.shape[0]
        bounds = [0] + [b for g in groups for b in (g.start, g.end)] + [B]
        if not groups or bounds[::2] != bounds[1::2]:
            raise ValueError(
                f"groups {[(g.start, g.end) for g in groups]} do not cover rows [0, {B}) in order"
            )
        cos, sin = self._rope(positions)  # [B, 1, T, d]
        # x [B, T, D]; every piece is computed per run of rows on the same weights
        x = _cat([F.embedding(tokens[s:e], o.embed) for s, e, o in _runs(groups, self._outer)])
        for i, resident in enumerate(self.layers):
            runs = _runs(groups, lambda g, i=i, r=resident: g.layers.get(i, r))
            parts = [
                self._block(w, x[s:e], cos[s:e], sin[s:e], slice(s, e), attend(i))
                for s, e, w in runs
            ]
            x = _cat(parts)
        return x

    def _head(self, h: Tensor, groups: list[Group]) -> Tensor:
        """h [B, ..., D] -> float32 logits [B, ..., V]."""
        eps = self.args.norm_eps
        runs = _runs(groups, self._outer)
        return _cat(
            [F.linear(rms_norm(h[s:e], o.norm, eps), o.lm_head).float() for s, e, o in runs]
        )

    @staticmethod
    def _causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
        )

    # ---- entry points ----------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        tokens: Tensor,
        starts: list[int],
        lengths: list[int],
        slots: list[int],
        cache: KVCache,
        groups: list[Group],
    ) -> Tensor:
        """Packed prompt chunks -> float32 logits [B, V] after each sequence's last chunk token.

        tokens [N] holds sequence b's next lengths[b] prompt tokens (it has starts[b] cached in
        slot slots[b]), b = 0..B-1 in turn; groups are over sequences. No padding: the linear
        layers see N real tokens; attention runs per sequence on its slot, causal over the
        cached prefix and the chunk.
        """
        dev = tokens.device
        offsets = [0, *itertools.accumulate(lengths)]  # sequence b: token rows [offsets[b], offsets[b+1])
        ends = [start + n for start, n in zip(starts, lengths, strict=True)]
        if max(ends) > cache.max_len:
            raise ModserveError(
                f"prompt of {max(ends)} tokens does not fit the KV cache (max_len {cache.max_len})"
            )
        sequence_at = {offset: b for b, offset in enumerate(offsets)}  # first row -> sequence
        positions = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends, strict=True)]).to(dev)  # [N]
        row_slots = torch.tensor(slots, device=dev).repeat_interleave(torch.tensor(lengths, device=dev))
        masks = {  # a later chunk: row t sees the slot's positions [0, starts[b] + t]
            b: torch.arange(ends[b], device=dev) <= positions[offsets[b] : offsets[b + 1], None]
            for b in range(len(lengths))
            if starts[b]
        }
        gqa = self.args.n_heads != self.args.n_kv_heads

        def attend(i: int) -> Attend:
            def fn(q, k, v, rows):
                cache.k[i][row_slots[rows], :, positions[rows]] = k[:, :, 0]  # [n, K, d]
                cache.v[i][row_slots[rows], :, positions[rows]] = v[:, :, 0]
                out = []
                for b in range(sequence_at[rows.start], sequence_at[rows.stop]):
                    q_b = q[offsets[b] - rows.start : offsets[b + 1] - rows.start, :, 0]  # [n_b, H, d]
                    keys = cache.k[i][slots[b], :, : ends[b]]  # [K, end_b, d], a view
                    values = cache.v[i][slots[b], :, : ends[b]]
                    o = F.scaled_dot_product_attention(
                        q_b.transpose(0, 1)[None], keys[None], values[None],
                        attn_mask=masks.get(b), is_causal=b not in masks, enable_gqa=gqa,
                    )  # [1, H, n_b, d]
                    out.append(o[0].transpose(0, 1))
                return _cat(out)[:, :, None]  # [n, H, 1, d]

            return fn

        token_groups = [replace(g, start=offsets[g.start], end=offsets[g.end]) for g in groups]
        h = self._forward(tokens[:, None], positions[:, None], token_groups, attend)  # [N, 1, D]
        last = h[torch.tensor(offsets[1:], device=dev) - 1, 0]  # [B, D]
        return self._head(last, groups)

    @torch.inference_mode()
    def decode(
        self, tokens: Tensor, positions: Tensor, cache: KVCache, groups: list[Group]
    ) -> Tensor:
        """tokens [B], positions [B] -> float32 logits [B, V]; row b is cache slot b.

        Writes K/V at positions[b] and attends to keys [0, positions[b]] of a view of the
        cache (slots [0, B), positions [0, max(positions)]). GQA without copying K/V: the
        H/K query heads sharing a kv head become the query-length axis of SDPA.
        """
        a = self.args
        L = int(positions.max()) + 1  # the one host sync of a step
        if L > cache.max_len:
            raise ModserveError(f"position {L - 1} is past the KV cache (max_len {cache.max_len})")
        rep = a.n_heads // a.n_kv_heads
        keep = torch.arange(L, device=positions.device) <= positions[:, None]  # [B, L]
        keep = keep[:, None, None, :]  # [B, 1, 1, L]
        row_ids = torch.arange(tokens.shape[0], device=positions.device)

        def attend(i: int) -> Attend:
            def fn(q, k, v, rows):
                n = q.shape[0]
                cache.k[i][row_ids[rows], :, positions[rows]] = k[:, :, 0]  # [n, K, d]
                cache.v[i][row_ids[rows], :, positions[rows]] = v[:, :, 0]
                keys, values = cache.k[i][rows, :, :L], cache.v[i][rows, :, :L]  # [n, K, L, d]
                q = q.reshape(n, a.n_kv_heads, rep, a.head_dim)  # [n, K, H/K, d]
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep[rows])
                return o.reshape(n, a.n_heads, 1, a.head_dim)

            return fn

        h = self._forward(tokens[:, None], positions[:, None], groups, attend)  # [B, 1, D]
        return self._head(h[:, 0], groups)

    @torch.inference_mode()
    def logits_all(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] -> float32 logits [B, T, V]; resident weights, no cache, no padding."""
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        groups = [Group(0, B)]
        h = self._forward(
            tokens, positions, groups, lambda i: lambda q, k, v, rows: self._causal(q, k, v)
        )
        return self._head(h, groups)
