"""The KV cache of the native engine: one preallocated K and V tensor per layer.

Layout per layer: [num_slots, n_kv_heads, max_len, head_dim]. A request owns one slot;
the scheduler keeps running requests in slots [0, B) so decode reads plain slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modserve.errors import ModserveError


class KVCache:
    def __init__(self, args, num_slots: int, max_len: int, device, dtype):
        self.num_slots, self.max_len = num_slots, max_len
        self.device, self.dtype = torch.device(device), dtype
        shape = (num_slots, args.n_kv_heads, max_len, args.head_dim)
        self.k: list[Tensor] = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)
        ]
        self.v: list[Tensor] = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)
        ]

    @torch.inference_mode()
    def move(self, src: Sequence[int], dst: Sequence[int], length: int) -> None:
        """Copy slot src[i] -> dst[i], positions [0, length), in every layer.

        All sources are read before any destination is written, so overlapping
        src/dst (a permutation step when compacting the batch) is safe.
        """
        src, dst = list(src), list(dst)
        if len(src) != len(dst) or len(set(dst)) != len(dst):
            raise ModserveError(f"KVCache.move: bad slot lists src={src} dst={dst}")
        if not src or length <= 0:
            return
        if not all(0 <= s < self.num_slots for s in src + dst) or length > self.max_len:
            raise ModserveError(f"KVCache.move: slots {src}->{dst} or length {length} out of range")
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for cache in (*self.k, *self.v):
            cache[d, :, :length] = cache[s, :, :length]  # the gather copies first

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
