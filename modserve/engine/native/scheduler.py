"""Continuous batching over language groups.

Running sequences sit in KV-cache slots 0..B-1, ordered by language group, so a
decode step reads the cache through slices and runs each swapped layer once per
group on a contiguous run of rows. The order is restored only when the batch
changes, by moving the few sequences that are out of place.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from modserve.engine.base import RESIDENT, FinishReason, GenerationRequest, PackUnavailableError
from modserve.engine.native.model import Group
from modserve.engine.native.pool import PackPool, PackWeights
from modserve.engine.text import TextStream


@dataclass
class Sequence:
    """One choice of one request, from waiting to finished."""

    request: GenerationRequest
    index: int
    text: TextStream
    generator: torch.Generator | None
    arrival: int  # admission order, to keep FIFO within a group
    stop_ids: frozenset[int]  # EOS (unless ignore_eos) and the request's stop_token_ids
    token_ids: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache
    slot: int = -1
    pack: PackWeights | None = None
    finish_reason: FinishReason | None = None

    @property
    def language(self) -> str:
        return self.request.language

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_token_ids


class Scheduler:
    def __init__(self, pool: PackPool | None, max_batch_size: int, max_prefill_tokens: int):
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # row i is cache slot i

    def admit(self) -> tuple[list[Sequence], list[tuple[Sequence, PackUnavailableError]]]:
        """Waiting sequences that fit now (free slot, pack on device), and those whose pack failed.

        A sequence whose pack is still loading stays waiting without holding up other languages.
        """
        admitted, failed, kept = [], [], deque()
        budget = self.max_prefill_tokens
        free_slot = len(self.running)
        while self.waiting:
            seq = self.waiting.popleft()
            room = free_slot < self.max_batch_size and (not admitted or len(seq.prompt) <= budget)
            if not room:
                kept.append(seq)
                continue
            try:
                pack = self.pool.acquire(seq.language) if seq.language != RESIDENT else None
            except PackUnavailableError as err:
                failed.append((seq, err))
                continue
            if seq.language != RESIDENT and pack is None:
                kept.append(seq)
                continue
            seq.pack, seq.slot = pack, free_slot
            free_slot += 1
            budget -= len(seq.prompt)
            admitted.append(seq)
        self.waiting = kept
        return admitted, failed

    def join(self, sequences: list[Sequence]) -> None:
        """Prefilled sequences (in slots after the running ones) become part of the batch."""
        self.running.extend(sequences)

    def leave(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from the batch or the queue; unpin its pack."""
        if seq in self.running:
            self.running.remove(seq)
            if seq.pack is not None:
                self.pool.release(seq.language)
                seq.pack = None
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def regroup(self) -> tuple[list[int], list[int]]:
        """Restore slots 0..B-1 in group order; return the (src, dst) slot moves to apply to the cache.

        Each group gets a contiguous range; members already inside it stay put, the rest
        fill its holes — so one sequence leaving moves at most one sequence per group.
        """
        order = sorted({seq.language for seq in self.running})
        members = {lang: [s for s in self.running if s.language == lang] for lang in order}
        src, dst, offset = [], [], 0
        for lang in order:
            target = range(offset, offset + len(members[lang]))
            settled = {s.slot for s in members[lang] if s.slot in target}
            holes = iter(slot for slot in target if slot not in settled)
            for seq in sorted(members[lang], key=lambda s: s.arrival):
                if seq.slot not in settled:
                    new = next(holes)
                    src.append(seq.slot)
                    dst.append(new)
                    seq.slot = new
            offset += len(members[lang])
        self.running.sort(key=lambda s: s.slot)
        return src, dst

    def groups(self, sequences: list[Sequence]) -> list[Group]:
        """Contiguous runs of rows that share a language, with that language's weights."""
        groups: list[Group] = []
        for row, seq in enumerate(sequences):
            if groups and sequences[row - 1].language == seq.language:
                groups[-1].end = row + 1
                continue
            pack = seq.pack
            groups.append(Group(row, row + 1, pack.layers if pack else {}, pack.outer if pack else None))
        return groups
