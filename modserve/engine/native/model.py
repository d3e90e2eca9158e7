"""The native forward: a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) in plain PyTorch.

Written in the manner of gpt-fast's model.py: a dataclass config, weights as plain
tensors, every shape spelled out. Numerics follow transformers' Llama/Mistral/Qwen2
(RMSNorm in float32, rotate_half RoPE on HF's q/k layout, llama3 frequency scaling,
SiLU-gated MLP, scaled_dot_product_attention). Reading configs and weights lives in
`config.py` and `weights.py`; attention over the cache in `attention.py`.

Layer swapping: a batch is split into `Group`s (contiguous rows sharing one language's
weights). For each layer the rows are processed in maximal runs of groups that use the
same `LayerWeights` object (`is` identity), so a layer no group overrides runs once over
the whole batch. A group's layer may instead be a `DeltaLayer` (a delta pack): its rows
stay in the resident's run, every linear reads the resident's weight once for the whole
run, and each delta group adds B·(A·h) on its own rows, with its own norms and biases.

Shapes: B batch rows, T tokens, D dim, H query heads, K kv heads, d head_dim, V vocab.
`prefill`, `decode` and `logits_all` run under torch.inference_mode themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from modserve.engine.native.attention import (
    DecodeBatch,
    PrefillBatch,
    causal_attention,
    decode_attention,
    prefill_attention,
)
from modserve.engine.native.cache import KVCache


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


def nbytes(*tensors: Tensor | None) -> int:
    """Bytes of distinct tensors (a tied lm_head counts once)."""
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

    def nbytes(self) -> int:
        return nbytes(*vars(self).values())


@dataclass
class LowRank:
    """Δ ≈ b @ a for one linear of a delta pack."""

    a: Tensor  # [r, in]
    b: Tensor  # [out, r]


@dataclass
class DeltaLayer:
    """A language's layer as the resident's plus low-rank changes; norms and biases whole.

    `deltas` and `biases` are keyed by LayerWeights field names (wq..w_down, bq..bo); a
    linear with no entry is the resident's."""

    attn_norm: Tensor  # [D]
    ffn_norm: Tensor  # [D]
    deltas: dict[str, LowRank]
    biases: dict[str, Tensor | None]

    def nbytes(self) -> int:
        factors = [t for f in self.deltas.values() for t in (f.a, f.b)]
        return nbytes(self.attn_norm, self.ffn_norm, *factors, *self.biases.values())


@dataclass
class Piece:
    """Rows [start, end) that run through one block call on `weights`, with the delta groups
    among them (row ranges relative to `start`)."""

    start: int
    end: int
    weights: LayerWeights
    deltas: list[tuple[int, int, DeltaLayer]]


@dataclass
class OuterWeights:
    embed: Tensor  # [V, D]
    norm: Tensor  # [D]
    lm_head: Tensor  # [V, D]; the same object as embed when tied

    def nbytes(self) -> int:
        return nbytes(self.embed, self.norm, self.lm_head)


@dataclass
class PrefillResult:
    logits: Tensor  # [B, V] float32 after each sequence's last chunk token
    hidden: dict[int, Tensor]  # sequence b -> final hidden states [n_b, D] of its chunk (when kept)


@dataclass
class Group:
    start: int  # rows [start, end)
    end: int
    layers: Mapping[int, LayerWeights | DeltaLayer] = field(default_factory=dict)  # swapped layers
    outer: OuterWeights | None = None  # override of embed / final norm / lm_head


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """[d/2] float32 inverse frequencies, with linear or llama3 scaling as transformers computes them."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = args.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
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


def runs(groups: list[Group], pick: Callable[[Group], object]) -> list[tuple[int, int, object]]:
    """Maximal runs of consecutive groups whose picked weights are the same object."""
    out: list[tuple[int, int, object]] = []
    for g in groups:
        w = pick(g)
        if out and out[-1][2] is w:
            out[-1] = (out[-1][0], g.end, w)
        else:
            out.append((g.start, g.end, w))
    return out


def pieces(groups: list[Group], layer: int, resident: LayerWeights) -> list[Piece]:
    """Block calls for one layer: a run of groups on one exact override, or on the resident
    with any delta groups among them."""
    out: list[Piece] = []
    for g in groups:
        own = g.layers.get(layer, resident)
        weights = resident if isinstance(own, DeltaLayer) else own
        if not out or out[-1].weights is not weights:
            out.append(Piece(g.start, g.start, weights, []))
        piece = out[-1]
        if isinstance(own, DeltaLayer):
            piece.deltas.append((g.start - piece.start, g.end - piece.start, own))
        piece.end = g.end
    return out


def per_row(default: Tensor | None, n: int, deltas: list[tuple[int, int, DeltaLayer]], pick) -> Tensor | None:
    """[n, 1, F] rows of `default`, each delta group's rows replaced by its own vector (None when
    no row has one)."""
    own = [(s, e, pick(d)) for s, e, d in deltas]
    if default is None and all(v is None for _, _, v in own):
        return None
    like = default if default is not None else next(v for _, _, v in own if v is not None)
    rows = (default if default is not None else torch.zeros_like(like)).expand(n, -1).clone()
    for s, e, v in own:
        rows[s:e] = 0 if v is None else v
    return rows[:, None]


def cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Transformer:
    def __init__(self, args: ModelArgs, layers: list[LayerWeights], outer: OuterWeights, device, dtype):
        if len(layers) != args.n_layers:
            raise ValueError(f"{len(layers)} layers given, config has {args.n_layers}")
        self.args, self.layers, self.outer = args, layers, outer
        self.device, self.dtype = torch.device(device), dtype
        self.inv_freq = rope_inv_freq(args).to(self.device)  # [d/2] float32

    def nbytes(self) -> int:
        """Resident weights (layers, embeddings, norm, lm_head)."""
        return self.outer.nbytes() + sum(layer.nbytes() for layer in self.layers)

    # ---- building blocks -------------------------------------------------------------------

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, d] in model dtype (float32 math, as HF)."""
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    def attention(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, rows: slice,
        cache: KVCache | None, batch: PrefillBatch | DecodeBatch | None,
    ) -> Tensor:
        """q [n, H, T, d], k/v [n, K, T, d] (RoPE applied) -> [n, H, T, d]. With a cache T is 1:
        the new K/V are written first, then the row attends to its slot."""
        if cache is None:
            return causal_attention(q, k, v)
        keys, values = cache.update(layer, batch.slots[rows], batch.positions[rows], k[:, :, 0], v[:, :, 0])
        attend = prefill_attention if isinstance(batch, PrefillBatch) else decode_attention
        return attend(q[:, :, 0], keys, values, batch, rows)[:, :, None]

    def block(self, layer: int, piece: Piece, x: Tensor, cos: Tensor, sin: Tensor, rows: slice, cache, batch) -> Tensor:
        """One decoder layer on x [n, T, D] (batch rows `rows`)."""
        n, T, _ = x.shape
        a = self.args
        H, K, d, eps = a.n_heads, a.n_kv_heads, a.head_dim, a.norm_eps
        w, deltas = piece.weights, piece.deltas

        def norm(x: Tensor, name: str) -> Tensor:
            weight = getattr(w, name)
            return rms_norm(x, per_row(weight, n, deltas, lambda dl: getattr(dl, name)) if deltas else weight, eps)

        def linear(h: Tensor, name: str, bias_name: str | None = None) -> Tensor:
            weight, bias = getattr(w, name), getattr(w, bias_name) if bias_name else None
            if not deltas:
                return F.linear(h, weight, bias)
            y = F.linear(h, weight)
            if bias_name and (rows_bias := per_row(bias, n, deltas, lambda dl: dl.biases.get(bias_name, bias))) is not None:
                y = y + rows_bias
            for s, e, dl in deltas:
                if (f := dl.deltas.get(name)) is not None:
                    y[s:e] += F.linear(F.linear(h[s:e], f.a), f.b)
            return y

        h = norm(x, "attn_norm")
        q = linear(h, "wq", "bq").view(n, T, H, d).transpose(1, 2)  # [n, H, T, d]
        k = linear(h, "wk", "bk").view(n, T, K, d).transpose(1, 2)  # [n, K, T, d]
        v = linear(h, "wv", "bv").view(n, T, K, d).transpose(1, 2)  # [n, K, T, d]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = self.attention(layer, q, k, v, rows, cache, batch)  # [n, H, T, d]
        x = x + linear(o.transpose(1, 2).reshape(n, T, H * d), "wo", "bo")
        h = norm(x, "ffn_norm")
        return x + linear(F.silu(linear(h, "w_gate")) * linear(h, "w_up"), "w_down")

    def outer_of(self, g: Group) -> OuterWeights:
        return self.outer if g.outer is None else g.outer

    def forward(self, tokens: Tensor, positions: Tensor, groups: list[Group], cache=None, batch=None) -> Tensor:
        """tokens/positions [B, T] -> final hidden states [B, T, D] (before the final norm)."""
        B = tokens.shape[0]
        bounds = [0] + [b for g in groups for b in (g.start, g.end)] + [B]
        if not groups or bounds[::2] != bounds[1::2]:
            raise ValueError(f"groups {[(g.start, g.end) for g in groups]} do not cover rows [0, {B}) in order")
        cos, sin = self.rope(positions)  # [B, 1, T, d]
        # x [B, T, D]; every piece is computed per run of rows on the same weights
        x = cat([F.embedding(tokens[s:e], o.embed) for s, e, o in runs(groups, self.outer_of)])
        for i, resident in enumerate(self.layers):
            parts = pieces(groups, i, resident)
            x = cat([self.block(i, p, x[p.start : p.end], cos[p.start : p.end], sin[p.start : p.end],
                                slice(p.start, p.end), cache, batch) for p in parts])
        return x

    def head(self, h: Tensor, groups: list[Group]) -> Tensor:
        """h [B, ..., D] -> float32 logits [B, ..., V]."""
        eps = self.args.norm_eps
        return cat([F.linear(rms_norm(h[s:e], o.norm, eps), o.lm_head).float() for s, e, o in runs(groups, self.outer_of)])

    # ---- entry points ----------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, tokens: Tensor, starts: list[int], lengths: list[int], slots: list[int], cache: KVCache,
        groups: list[Group], keep_hidden: frozenset[int] = frozenset(),
    ) -> PrefillResult:
        """Packed prompt chunks -> float32 logits [B, V] after each sequence's last chunk token,
        and for the sequences in `keep_hidden` every chunk token's final hidden state (their
        prompt log-probabilities are read from it, a slice at a time, by `head`).

        tokens [N] holds sequence b's next lengths[b] prompt tokens (it has starts[b] cached in
        slot slots[b]), b = 0..B-1 in turn; groups are over sequences. No padding: the linear
        layers see N real tokens; attention runs per sequence on its slot, causal over the
        cached prefix and the chunk.
        """
        batch = PrefillBatch.of(starts, lengths, slots, tokens.device)
        if max(batch.ends) > cache.max_len:
            raise ValueError(f"prompt of {max(batch.ends)} tokens does not fit the KV cache (max_len {cache.max_len})")
        token_groups = [replace(g, start=batch.offsets[g.start], end=batch.offsets[g.end]) for g in groups]
        h = self.forward(tokens[:, None], batch.positions[:, None], token_groups, cache, batch)  # [N, 1, D]
        last = h[torch.tensor(batch.offsets[1:], device=tokens.device) - 1, 0]  # [B, D]
        hidden = {b: h[batch.offsets[b] : batch.offsets[b + 1], 0] for b in keep_hidden}
        return PrefillResult(self.head(last, groups), hidden)

    @torch.inference_mode()
    def decode(self, tokens: Tensor, positions: Tensor, cache: KVCache, groups: list[Group]) -> Tensor:
        """tokens [B], positions [B] -> float32 logits [B, V]; row b is cache slot b.

        Writes K/V at positions[b] and attends to keys [0, positions[b]] of slot b.
        """
        batch = DecodeBatch.of(positions)
        if batch.length > cache.max_len:
            raise ValueError(f"position {batch.length - 1} is past the KV cache (max_len {cache.max_len})")
        h = self.forward(tokens[:, None], positions[:, None], groups, cache, batch)  # [B, 1, D]
        return self.head(h[:, 0], groups)

    @torch.inference_mode()
    def logits_all(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] -> float32 logits [B, T, V]; resident weights, no cache, no padding."""
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        groups = [Group(0, B)]
        return self.head(self.forward(tokens, positions, groups), groups)
