"""The KV cache of the native engine: one preallocated K and V tensor per layer.

Layout per layer: [num_slots, n_kv_heads, max_len, head_dim]. A sequence owns one slot;
the scheduler keeps decoding sequences in slots [0, B) so decode reads plain slices.
Every write goes through `update` (new tokens) or `move` (slots changing places).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class KVCache:
    def __init__(self, args, num_slots: int, max_len: int, device, dtype):
        self.num_slots, self.max_len = num_slots, max_len
        self.device, self.dtype = torch.device(device), dtype
        shape = (num_slots, args.n_kv_heads, max_len, args.head_dim)
        self.k: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]

    def update(self, layer: int, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [n, K, d] of n token rows at (slots[i], positions[i]); return the layer's
        whole K and V [num_slots, K, max_len, d] for attention to read."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v
        return self.k[layer], self.v[layer]

    @torch.inference_mode()
    def move(self, src: Sequence[int], dst: Sequence[int], length: int) -> None:
        """Copy slot src[i] -> dst[i], positions [0, length), in every layer.

        All sources are read before any destination is written, so overlapping
        src/dst (a permutation step when compacting the batch) is safe.
        """
        src, dst = list(src), list(dst)
        if len(src) != len(dst) or len(set(dst)) != len(dst):
            raise ValueError(f"KVCache.move: bad slot lists src={src} dst={dst}")
        if not src or length <= 0:
            return
        if not all(0 <= s < self.num_slots for s in src + dst) or length > self.max_len:
            raise ValueError(f"KVCache.move: slots {src}->{dst} or length {length} out of range")
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for cache in (*self.k, *self.v):
            cache[d, :, :length] = cache[s, :, :length]  # the gather copies first

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
