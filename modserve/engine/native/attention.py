"""Attention over the KV cache, as plain functions of the tensors they read.

Prefill packs prompt chunks without padding: token row t belongs to one sequence, which
attends causally over its slot's cached prefix and its own chunk. Decode has one token
per row, and row b is cache slot b, so it reads the cache through plain slices.

Shapes: N token rows (n of them in one call), H query heads, K kv heads, d head_dim,
S cache slots, M cache length, B sequences.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PrefillBatch:
    """Where one prefill step's packed chunks sit: sequence b has its next lengths[b] prompt
    tokens in token rows [offsets[b], offsets[b+1]) and starts[b] tokens already in slot seq_slots[b]."""

    positions: Tensor  # [N] position of each token row
    slots: Tensor  # [N] cache slot of each token row
    seq_slots: list[int]  # [B]
    offsets: list[int]  # [B + 1]
    ends: list[int]  # [B] cached length once this chunk is written
    masks: dict[int, Tensor]  # sequences with a cached prefix: row t sees positions [0, starts[b] + t]
    sequence_at: dict[int, int]  # first token row of a sequence -> that sequence

    @classmethod
    def of(cls, starts: list[int], lengths: list[int], slots: list[int], device) -> PrefillBatch:
        offsets = [0, *itertools.accumulate(lengths)]
        ends = [start + n for start, n in zip(starts, lengths, strict=True)]
        positions = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends, strict=True)]).to(device)
        row_slots = torch.tensor(slots, device=device).repeat_interleave(torch.tensor(lengths, device=device))
        masks = {
            b: torch.arange(ends[b], device=device) <= positions[offsets[b] : offsets[b + 1], None]
            for b in range(len(lengths))
            if starts[b]
        }
        sequence_at = {offset: b for b, offset in enumerate(offsets)}
        return cls(positions, row_slots, list(slots), offsets, ends, masks, sequence_at)


@dataclass
class DecodeBatch:
    """One new token per sequence; row b is cache slot b and sits at positions[b]."""

    positions: Tensor  # [B]
    slots: Tensor  # [B] = arange(B)
    length: int  # L: the longest row's positions [0, L) are read
    keep: Tensor  # [B, 1, 1, L] key position <= the row's position

    @classmethod
    def of(cls, positions: Tensor) -> DecodeBatch:
        length = int(positions.max()) + 1  # the one host sync of a step
        keep = torch.arange(length, device=positions.device) <= positions[:, None]
        slots = torch.arange(positions.shape[0], device=positions.device)
        return cls(positions, slots, length, keep[:, None, None, :])


def prefill_attention(q: Tensor, keys: Tensor, values: Tensor, batch: PrefillBatch, rows: slice) -> Tensor:
    """q [n, H, d] for token rows `rows` (whole sequences); keys/values [S, K, M, d] -> [n, H, d]."""
    gqa = q.shape[1] != keys.shape[1]
    out = []
    for b in range(batch.sequence_at[rows.start], batch.sequence_at[rows.stop]):
        start, stop = batch.offsets[b] - rows.start, batch.offsets[b + 1] - rows.start
        q_b = q[start:stop].transpose(0, 1)[None]  # [1, H, n_b, d]
        k_b = keys[batch.seq_slots[b], :, : batch.ends[b]][None]  # [1, K, end_b, d], a view
        v_b = values[batch.seq_slots[b], :, : batch.ends[b]][None]
        mask = batch.masks.get(b)
        o = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        out.append(o[0].transpose(0, 1))  # [n_b, H, d]
    return out[0] if len(out) == 1 else torch.cat(out)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, batch: DecodeBatch, rows: slice) -> Tensor:
    """q [n, H, d] for rows (= slots) `rows`; keys/values [S, K, M, d] -> [n, H, d].

    GQA without copying K/V: the H/K query heads sharing a kv head become SDPA's query axis.
    """
    n, H, d = q.shape
    K = keys.shape[1]
    k, v = keys[rows, :, : batch.length], values[rows, :, : batch.length]  # [n, K, L, d]
    o = F.scaled_dot_product_attention(q.reshape(n, K, H // K, d), k, v, attn_mask=batch.keep[rows])
    return o.reshape(n, H, d)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """No cache: q [B, H, T, d], k/v [B, K, T, d] -> [B, H, T, d]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
