"""Block packs by tier: on the device within a byte budget, spilled to host, or on disk.

The scheduler asks for a pack between steps and never waits for one: a pack not on the
device is brought by a background thread (once, however many requests want it) and
becomes visible only when every tensor is in place and verified. A pack handed out is
leased: it stays on the device until every lease on it is released. A pack brought for
waiting requests is held for them until they take their leases (or stop waiting), so
another load cannot evict it first. Only packs neither leased nor held are evicted, least
recently used first, and only for a load that then fits.

On CUDA, copies between host and device run on a side stream from pinned host memory and
the loader thread waits on an event: the decode stream is never synchronized, and the
pool's lock is never held during a copy.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from modserve.engine.base import EngineObserver, NullObserver, PackUnavailableError
from modserve.engine.native.model import DeltaLayer, LayerWeights, ModelArgs, OuterWeights
from modserve.engine.native.weights import delta_layer_weights, layer_weights, outer_weights
from modserve.errors import ModserveError
from modserve.packs.format import Manifest, ResidentHashes, load_verified_pack, read_manifest

log = logging.getLogger(__name__)
RETRY_FAILED_AFTER_S = 30.0
CPU = torch.device("cpu")


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor], done: dict[int, torch.Tensor]):
    """`obj` (tensors inside dataclasses and dicts) with `fn` applied once to each distinct tensor."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        if id(obj) not in done:
            done[id(obj)] = fn(obj)
        return done[id(obj)]
    if isinstance(obj, dict):
        return {key: map_tensors(value, fn, done) for key, value in obj.items()}
    return replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn, done) for f in fields(obj)})


@dataclass
class PackWeights:
    """One language's swapped layers, exact or delta (and outer weights when the plan swaps them)."""

    language: str
    layers: dict[int, LayerWeights | DeltaLayer]
    outer: OuterWeights | None

    @property
    def nbytes(self) -> int:
        outer = self.outer.nbytes() if self.outer else 0
        return outer + sum(layer.nbytes() for layer in self.layers.values())

    def tensors(self) -> list[torch.Tensor]:
        found: dict[int, torch.Tensor] = {}
        self.map(lambda t: found.setdefault(id(t), t))
        return list(found.values())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackWeights:
        """`fn` applied to every distinct tensor (tied tensors stay tied)."""
        done: dict[int, torch.Tensor] = {}
        return PackWeights(self.language, map_tensors(self.layers, fn, done), map_tensors(self.outer, fn, done))


class Transfers:
    """Pack copies between host and the device, off the decode stream (a no-op on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_device(self, pack: PackWeights) -> PackWeights:
        """From host memory (pinned first where it is not) to the device; returns once the copy
        is complete, having waited on an event, not on the decode stream."""
        if self.stream is None:
            return pack
        pinned = pack.map(lambda t: t if t.is_pinned() else t.pin_memory())
        with torch.cuda.stream(self.stream):
            moved = pinned.map(lambda t: t.to(self.device, non_blocking=True))
        self.stream.synchronize()  # the side stream only: decode keeps running
        decode = torch.cuda.default_stream(self.device)
        for t in moved.tensors():
            t.record_stream(decode)  # freed later, the memory waits for decode's queued work
        return moved

    def to_host(self, pack: PackWeights) -> PackWeights:
        """Device to pinned host memory, after the decode work queued so far (which may still read it)."""
        if self.stream is None:
            return pack
        self.stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self.stream):
            host = pack.map(lambda t: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True))
        for t in pack.tensors():
            t.record_stream(self.stream)  # the device copy is freed only after this read
        self.stream.synchronize()
        return host


class Pending(enum.Enum):
    """Why acquire() returned no lease."""

    LOADING = "loading"  # on its way to the device: ask again next step
    NO_ROOM = "no room"  # cannot fit until leased packs are released


class PackLease:
    """One holder's claim on a pack on the device; `release` is idempotent."""

    def __init__(self, pool: PackPool, weights: PackWeights):
        self.weights = weights
        self._pool: PackPool | None = pool

    @property
    def language(self) -> str:
        return self.weights.language

    def release(self) -> None:
        if self._pool is not None:
            self._pool._unpin(self.language)
            self._pool = None


def serving_bytes(manifest: Manifest, dtype: torch.dtype) -> int:
    """Bytes a pack takes once loaded in the serving dtype, known before loading it."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(size * _numel(entry["shape"]) for entry in manifest.tensors.values())


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


class PackPool:
    def __init__(
        self,
        packs: dict[str, Path],
        resident: ResidentHashes | None,
        args: ModelArgs,
        device: torch.device,
        dtype: torch.dtype,
        device_budget: int,
        host_budget: int,
        observer: EngineObserver | None = None,
    ):
        self.paths = dict(packs)
        self.resident = resident
        self.args, self.device, self.dtype = args, device, dtype
        self.device_budget, self.host_budget = device_budget, host_budget
        self.observer = observer or NullObserver()
        self.manifests = {lang: self._check_manifest(lang, path) for lang, path in self.paths.items()}
        self.sizes = {lang: serving_bytes(m, dtype) for lang, m in self.manifests.items()}
        too_big = [lang for lang, size in self.sizes.items() if size > device_budget]
        if too_big:
            raise ModserveError(
                f"engine.pack_memory: {device_budget} bytes cannot hold the {too_big[0]} pack "
                f"({self.sizes[too_big[0]]} bytes in {dtype}); raise the budget"
            )
        self.transfers = Transfers(device)
        self._lock = threading.Lock()
        self._device: OrderedDict[str, PackWeights] = OrderedDict()  # least recently used first
        self._host: OrderedDict[str, PackWeights] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._held: set[str] = set()  # brought for waiting requests that have not leased it yet
        self._loading: dict[str, int] = {}  # language -> bytes reserved on the device
        self._spilling: dict[str, PackWeights] = {}  # evicted, on the device until copied out
        self._failed: dict[str, float] = {}  # language -> when its load failed
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-loader")
        self.wakeup: threading.Event | None = None  # set when a load finishes

    def _check_manifest(self, language: str, path: Path) -> Manifest:
        manifest = read_manifest(path)
        if manifest.language != language:
            raise ModserveError(f"packs.{language}: {path} is the {manifest.language!r} pack")
        if manifest.num_layers != self.args.n_layers:
            raise ModserveError(
                f"packs.{language}: {path} was cut for {manifest.num_layers} layers, "
                f"the resident has {self.args.n_layers}"
            )
        return manifest

    # --- called by the scheduler between steps -----------------------------------------

    def acquire(self, language: str) -> PackLease | Pending:
        """A lease on the pack if it is on the device; else why not (and a load started if it fits).

        Raises PackUnavailableError while a failed load is recent (then it is retried)."""
        with self._lock:
            failed_at = self._failed.get(language)
            if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_AFTER_S:
                raise PackUnavailableError(language)
            pack = self._device.get(language)
            if pack is not None:
                self._device.move_to_end(language)
                self._pins[language] = self._pins.get(language, 0) + 1
                self._held.discard(language)
                return PackLease(self, pack)
            if language in self._loading or language in self._spilling:
                return Pending.LOADING
            victims = self._reserve(language)
            if victims is None:
                return Pending.NO_ROOM
            self._failed.pop(language, None)
            spilled = self._host.pop(language, None)  # taken aside, so a spill can't drop it
            self._loader.submit(self._bring_to_device, language, spilled, victims)
            return Pending.LOADING

    def held(self, language: str) -> bool:
        """Brought to the device for waiting requests that have not leased it yet."""
        with self._lock:
            return language in self._held

    def retain(self, languages: set[str]) -> None:
        """Languages with waiting requests: a held pack no one waits for any more loses its hold."""
        with self._lock:
            self._held &= languages

    def _unpin(self, language: str) -> None:
        with self._lock:
            self._pins[language] -= 1

    def _reserve(self, language: str) -> list[str] | None:
        """Room for `language` on the device, evicting least recently used packs no one leases or
        holds, only if that makes it fit; the evicted languages (to spill), or None."""
        need = self.sizes[language]
        free = self.device_budget - self._device_bytes()
        evictable = [lang for lang in self._device if not self._pins.get(lang) and lang not in self._held]
        if free + sum(self.sizes[lang] for lang in evictable) < need:
            return None
        victims = []
        for lang in evictable:
            if free >= need:
                break
            victims.append(lang)
            free += self.sizes[lang]
        for lang in victims:
            self._spilling[lang] = self._device.pop(lang)
        self._loading[language] = need
        return victims

    def _device_bytes(self) -> int:
        on_device = [*self._device, *self._spilling]
        return sum(self.sizes[lang] for lang in on_device) + sum(self._loading.values())

    # --- the loader thread ---------------------------------------------------------------

    def _bring_to_device(self, language: str, spilled: PackWeights | None, victims: list[str]) -> None:
        try:
            for victim in victims:
                self._spill(victim)
            start = time.perf_counter()
            source = "host" if spilled is not None else "disk"
            try:
                pack = self.transfers.to_device(spilled if spilled is not None else self._load_from_disk(language))
            except Exception as err:  # a bad pack must not take the engine down
                log.error("pack %s refused: %s", language, err if isinstance(err, ModserveError) else repr(err))
                with self._lock:
                    self._loading.pop(language, None)
                    self._failed[language] = time.monotonic()
                self.observer.pack_load_failed(language, type(err).__name__)
            else:
                with self._lock:
                    self._loading.pop(language, None)
                    self._device[language] = pack
                    self._held.add(language)
                self.observer.pack_loaded(language, source, time.perf_counter() - start)
        finally:
            if self.wakeup is not None:
                self.wakeup.set()

    def _spill(self, language: str) -> None:
        """Move an evicted pack to host memory (or drop it when the host tier has no room)."""
        pack = self._spilling[language]  # only this thread removes it
        host = self.transfers.to_host(pack) if self.host_budget >= self.sizes[language] else None
        with self._lock:
            self._spilling.pop(language, None)
            if host is None:
                return
            self._host[language] = host
            while sum(self.sizes[lang] for lang in self._host) > self.host_budget:
                self._host.popitem(last=False)

    def _load_from_disk(self, language: str) -> PackWeights:
        """Read and verify on the host, in the serving dtype; the device copy is the caller's."""
        manifest, tensors = load_verified_pack(self.paths[language], self.resident, language)
        read_layer = delta_layer_weights if manifest.kind == "delta" else layer_weights
        layers = {i: read_layer(tensors, i, CPU, self.dtype) for i in manifest.layers}
        outer = None
        if manifest.non_layer_tensors:
            outer = outer_weights(tensors, self.args, CPU, self.dtype)
        pack = PackWeights(language, layers, outer)
        return pack if self.device.type == "cuda" else pack.map(lambda t: t.to(self.device))

    # --- reporting -------------------------------------------------------------------------

    def tier(self, language: str) -> str:
        with self._lock:
            if language in self._device:
                return "device"
            return "host" if language in self._host else "disk"

    def stats(self) -> tuple[dict[str, int], dict[str, int]]:
        """(packs per tier, bytes per tier)."""
        with self._lock:
            device, host = {*self._device, *self._spilling}, set(self._host)
        disk = set(self.paths) - device - host
        tiers = {"device": device, "host": host, "disk": disk}
        counts = {tier: len(langs) for tier, langs in tiers.items()}
        sizes = {tier: sum(self.sizes[lang] for lang in langs) for tier, langs in tiers.items()}
        return counts, sizes

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
