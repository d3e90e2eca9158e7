"""Which language's layers the vLLM model holds, and which waiting request goes in next.

One vLLM step runs one set of weights, so requests wait in per-language queues and are
admitted one language group at a time. The policy knows nothing about vLLM: it orders
waiting items (anything with an id, a language, an arrival time and a waiting_since the
policy sets).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from modserve.engine.base import QueueFullError
from modserve.languages import RESIDENT


class Waiting(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def language(self) -> str: ...
    arrival: float  # its place in its language's queue
    waiting_since: float  # since when it waits: its arrival, or when it was last preempted


class LanguageGroups:
    """Waiting requests by language, and the policy deciding whose layers the model holds.

    The active group admits freely while it is alone. Once another language waits, the
    active group keeps the model for `time_slice` more seconds (counted from when that
    language began waiting, or from the swap if later), so every swap is paid for by a slice
    of work and no language starves. Then its running requests are preempted (requeued where
    they were, waiting from then on), and the language whose request has waited longest goes
    next — first come, first served, a preempted request coming again when it was preempted,
    so new arrivals do not wait behind every language's unfinished decodes. `resident` is a
    group like any other.
    """

    def __init__(self, time_slice: float, max_waiting: int, clock: Callable[[], float] = time.monotonic):
        self.time_slice, self.max_waiting, self.clock = time_slice, max_waiting, clock
        self.queues: dict[str, deque[Waiting]] = {}
        self.active: str | None = RESIDENT  # whose layers the model holds; None: unknown
        self.active_since = clock()

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.queues.values())

    def push(self, item: Waiting) -> None:
        if len(self) >= self.max_waiting:
            raise QueueFullError(f"{len(self)} requests are already waiting; retry later")
        item.waiting_since = item.arrival
        self.queues.setdefault(item.language, deque()).append(item)

    def requeue(self, item: Waiting) -> None:
        """Back in its queue at its arrival (a preempted request goes before later ones), waiting
        from now; never refused."""
        item.waiting_since = self.clock()
        queue = self.queues.setdefault(item.language, deque())
        position = next((k for k, other in enumerate(queue) if other.arrival > item.arrival), len(queue))
        queue.insert(position, item)

    def find(self, request_id: str) -> Waiting | None:
        return next((item for queue in self.queues.values() for item in queue if item.id == request_id), None)

    def remove(self, item: Waiting) -> None:
        self.queues[item.language].remove(item)

    def take_all(self, language: str) -> list[Waiting]:
        return list(self.queues.pop(language, ()))

    def activate(self, target: str | None) -> None:
        self.active, self.active_since = target, self.clock()

    def slice_ends_at(self) -> float | None:
        """When the active group's slice ends (clock time); None while no other language waits."""
        others = [self._longest_wait(queue) for lang, queue in self.queues.items() if queue and lang != self.active]
        return max(self.active_since, min(others)) + self.time_slice if others else None

    @staticmethod
    def _longest_wait(queue: deque[Waiting]) -> float:
        return min(item.waiting_since for item in queue)

    def slice_over(self) -> bool:
        end = self.slice_ends_at()
        return end is not None and self.clock() >= end

    def pop_admissible(self) -> Waiting | None:
        """The active group's next request, while its slice lasts."""
        queue = self.queues.get(self.active)
        if not queue or self.slice_over():
            return None
        return queue.popleft()

    def next_group(self) -> str | None:
        """The group to hold the model once nothing runs: the active one while its slice lasts,
        else the language whose request has waited longest."""
        waits = {lang: self._longest_wait(queue) for lang, queue in self.queues.items() if queue}
        if self.active in waits and not self.slice_over():
            return self.active
        others = {lang: since for lang, since in waits.items() if lang != self.active} or waits
        return min(others, key=others.__getitem__) if others else None

    def by_language(self) -> dict[str, int]:
        return {lang: len(queue) for lang, queue in self.queues.items() if queue}


class OneBatch(LanguageGroups):
    """Admission when every language shares each step (pack_modes grouped and lora): first
    come, first served across all queues; no slice ever ends, no swap is ever needed."""

    def slice_ends_at(self) -> float | None:
        return None

    def pop_admissible(self) -> Waiting | None:
        heads = [queue for queue in self.queues.values() if queue]
        return min(heads, key=lambda queue: queue[0].arrival).popleft() if heads else None

    def next_group(self) -> str | None:
        return None
