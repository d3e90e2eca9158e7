"""Continuous batching over language groups, with chunked prefill: one `StepPlan` per step.

Decoding sequences sit in KV-cache slots 0..R-1, ordered by language group, so a
decode step reads the cache through slices and runs each swapped layer once per
group on a contiguous run of rows; sequences still prefilling follow in R..R+P-1.
The order is restored only when the batch changed, by moving the few sequences
that are out of place. A step prefills at most `max_prefill_tokens` prompt tokens,
so one long prompt cannot stall every running request for its whole length.

Admission is first come, first served across languages when pack memory is short: once
the oldest waiting sequence finds no room for its pack, later sequences take no new
leases (only those whose pack was brought for them), so the leases it waits on end and
its wait is bounded by the requests already running.

The scheduler only decides; the engine applies the plan (cache moves, prefill,
decode), then reports back with `prefilled` and `finish`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from modserve.engine.base import FinishReason, GenerationRequest, PackUnavailableError, TokenLogprob
from modserve.engine.native.grammar import RowGrammar
from modserve.engine.native.model import Group
from modserve.engine.native.pool import PackLease, PackPool, Pending
from modserve.engine.text import TextStream
from modserve.languages import RESIDENT


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
    lease: PackLease | None = None  # held from admission to finish (resident: None)
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # built chunk by chunk, when asked for
    grammar: RowGrammar | None = None  # its structured-output constraint, when it has one

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Asked for, and this is the choice that reports them (all choices share the prompt)."""
        return self.request.params.prompt_logprobs is not None and self.index == 0

    @property
    def language(self) -> str:
        return self.request.language

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_token_ids


@dataclass
class PrefillChunk:
    seq: Sequence
    size: int  # prompt tokens [seq.cached, seq.cached + size) are cached this step


@dataclass
class StepPlan:
    """Everything one step does, in order: move slots, prefill chunks, decode rows."""

    moves: tuple[list[int], list[int]]  # (src, dst) cache slots, positions [0, move_length)
    move_length: int
    prefill: list[PrefillChunk]  # by language group, then arrival
    prefill_groups: list[Group]  # over prefill sequences
    decode: list[Sequence]  # row b is cache slot b
    decode_groups: list[Group]
    refused: list[tuple[Sequence, PackUnavailableError]]  # their pack failed to load

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, pool: PackPool | None, max_batch_size: int, max_prefill_tokens: int):
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # decoding; row i is cache slot i
        self.prefilling: list[Sequence] = []  # holding a slot, part of the prompt cached

    @property
    def slotted(self) -> list[Sequence]:
        """Every sequence holding a cache slot: decoding, then prefilling."""
        return [*self.running, *self.prefilling]

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> StepPlan:
        moves = self._regroup()
        length = max((s.cached for s in self.slotted), default=0)
        chunks, refused = self._admit()
        chunks.sort(key=lambda c: (c.seq.language, c.seq.arrival))
        decode = list(self.running)
        return StepPlan(
            moves, length, chunks, self.groups([c.seq for c in chunks]), decode, self.groups(decode), refused
        )

    def prefilled(self, chunks: list[PrefillChunk]) -> list[Sequence]:
        """Account a step's prefill; sequences whose whole prompt is cached join the decoders
        (the next plan puts them in place). Returns those."""
        done = []
        for chunk in chunks:
            chunk.seq.cached += chunk.size
            if chunk.seq.cached == len(chunk.seq.prompt) and chunk.seq in self.prefilling:
                self.prefilling.remove(chunk.seq)
                self.running.append(chunk.seq)
                done.append(chunk.seq)
        return done

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from the batch or the queue; release its pack."""
        for members in (self.running, self.prefilling, self.waiting):
            if seq in members:
                members.remove(seq)
                break
        if seq.lease is not None:
            seq.lease.release()
            seq.lease = None

    def _admit(self) -> tuple[list[PrefillChunk], list[tuple[Sequence, PackUnavailableError]]]:
        """Sequences already prefilling go first; waiting ones then take free slots (their pack
        on device) while the token budget lasts. A sequence whose pack is still loading stays
        waiting without holding up other languages. Called with the slots compact."""
        budget = self.max_prefill_tokens
        chunks = []
        for seq in sorted(self.prefilling, key=lambda s: s.arrival):
            if budget == 0:
                break
            size = min(len(seq.prompt) - seq.cached, budget)
            chunks.append(PrefillChunk(seq, size))
            budget -= size
        refused, kept = [], deque()
        free_slot = len(self.running) + len(self.prefilling)
        blocked = False  # an older sequence waits for room that only leases ending can free
        while self.waiting:
            seq = self.waiting.popleft()
            if free_slot >= self.max_batch_size or budget == 0:
                kept.append(seq)
                continue
            if seq.language != RESIDENT:
                if blocked and not self.pool.held(seq.language):
                    kept.append(seq)
                    continue
                try:
                    lease = self.pool.acquire(seq.language)
                except PackUnavailableError as err:
                    refused.append((seq, err))
                    continue
                if not isinstance(lease, PackLease):
                    blocked = blocked or lease is Pending.NO_ROOM
                    kept.append(seq)
                    continue
                seq.lease = lease
            seq.slot = free_slot
            free_slot += 1
            size = min(len(seq.prompt), budget)
            budget -= size
            self.prefilling.append(seq)
            chunks.append(PrefillChunk(seq, size))
        self.waiting = kept
        if self.pool is not None:
            self.pool.retain({seq.language for seq in kept})
        return chunks, refused

    def _regroup(self) -> tuple[list[int], list[int]]:
        """Restore the slot layout; return the (src, dst) slot moves that do it.

        Each language group of `running` gets a contiguous range, in language order, and
        `prefilling` the range after them; members already inside their range stay put, the
        rest fill its holes — so one sequence leaving moves at most one sequence per range.
        """
        languages = sorted({seq.language for seq in self.running})
        ranges = [[s for s in self.running if s.language == lang] for lang in languages]
        ranges.append(self.prefilling)
        src, dst, offset = [], [], 0
        for members in ranges:
            target = range(offset, offset + len(members))
            settled = {s.slot for s in members if s.slot in target}
            holes = iter(slot for slot in target if slot not in settled)
            for seq in sorted(members, key=lambda s: s.arrival):
                if seq.slot not in settled:
                    new = next(holes)
                    src.append(seq.slot)
                    dst.append(new)
                    seq.slot = new
            offset += len(members)
        self.running.sort(key=lambda s: s.slot)
        self.prefilling.sort(key=lambda s: s.slot)
        return src, dst

    @staticmethod
    def groups(sequences: list[Sequence]) -> list[Group]:
        """Contiguous runs of rows that share a language, with that language's weights."""
        groups: list[Group] = []
        for row, seq in enumerate(sequences):
            if groups and sequences[row - 1].language == seq.language:
                groups[-1].end = row + 1
                continue
            pack = seq.lease.weights if seq.lease else None
            groups.append(Group(row, row + 1, pack.layers if pack else {}, pack.outer if pack else None))
        return groups
