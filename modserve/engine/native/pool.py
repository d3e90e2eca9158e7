"""Block packs by tier: on the device within a byte budget, spilled to host, or on disk.

The scheduler asks for a pack between steps and never waits for one: a pack not
on the device is loaded by a background thread (once, however many requests
want it) and becomes visible only when every tensor is in place and verified.
A pack handed out is leased: it stays on the device until every lease on it is
released; only packs without leases are evicted, least recently used first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from modserve.engine.base import EngineObserver, NullObserver, PackUnavailableError
from modserve.engine.native.model import LayerWeights, ModelArgs, OuterWeights
from modserve.engine.native.weights import layer_weights, outer_weights
from modserve.errors import ModserveError
from modserve.packs.format import Manifest, ResidentHashes, load_verified_pack, read_manifest

log = logging.getLogger(__name__)
RETRY_FAILED_AFTER_S = 30.0


@dataclass
class PackWeights:
    """One language's swapped layers (and outer weights when the plan swaps them)."""

    language: str
    layers: dict[int, LayerWeights]
    outer: OuterWeights | None

    @property
    def nbytes(self) -> int:
        outer = self.outer.nbytes() if self.outer else 0
        return outer + sum(layer.nbytes() for layer in self.layers.values())

    def to(self, device: torch.device, pin: bool = False) -> PackWeights:
        """A copy on `device` (pinned when it is host memory for a GPU); tied tensors stay tied."""
        moved: dict[int, torch.Tensor] = {}

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is not None and id(t) not in moved:
                out = t.to(device, non_blocking=True)
                moved[id(t)] = out.pin_memory() if pin else out
            return None if t is None else moved[id(t)]

        def move_all(weights):
            return replace(weights, **{f.name: move(getattr(weights, f.name)) for f in fields(weights)})

        layers = {i: move_all(layer) for i, layer in self.layers.items()}
        return PackWeights(self.language, layers, move_all(self.outer) if self.outer else None)


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
        self._lock = threading.Lock()
        self._device: OrderedDict[str, PackWeights] = OrderedDict()  # least recently used first
        self._host: OrderedDict[str, PackWeights] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._loading: dict[str, int] = {}  # language -> bytes reserved on the device
        self._failed: dict[str, tuple[float, str]] = {}
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

    def acquire(self, language: str) -> PackLease | None:
        """A lease on the pack if it is on the device; else start bringing it there and return None."""
        with self._lock:
            failed = self._failed.get(language)
            if failed and time.monotonic() - failed[0] < RETRY_FAILED_AFTER_S:
                raise PackUnavailableError(f"pack {language!r} is unavailable: {failed[1]}")
            pack = self._device.get(language)
            if pack is not None:
                self._device.move_to_end(language)
                self._pins[language] = self._pins.get(language, 0) + 1
                return PackLease(self, pack)
            if language in self._loading:
                return None
            spilled = self._host.pop(language, None)  # held aside, so making room can't drop it
            if self._reserve(language):
                self._failed.pop(language, None)
                self._loader.submit(self._bring_to_device, language, spilled)
            elif spilled is not None:
                self._host[language] = spilled
            return None

    def _unpin(self, language: str) -> None:
        with self._lock:
            self._pins[language] -= 1

    def _reserve(self, language: str) -> bool:
        """Make room on the device (evicting unpinned LRU packs to host); hold it for the load."""
        need = self.sizes[language]
        for victim in list(self._device):
            if self._device_bytes() + need <= self.device_budget:
                break
            if self._pins.get(victim, 0) == 0:
                self._spill(victim)
        if self._device_bytes() + need > self.device_budget:
            return False
        self._loading[language] = need
        return True

    def _device_bytes(self) -> int:
        return sum(self.sizes[lang] for lang in self._device) + sum(self._loading.values())

    def _spill(self, language: str) -> None:
        pack = self._device.pop(language)
        if self.host_budget <= 0:
            return
        on_cuda = self.device.type == "cuda"
        self._host[language] = pack.to(torch.device("cpu"), pin=on_cuda) if on_cuda else pack
        while sum(self.sizes[lang] for lang in self._host) > self.host_budget:
            self._host.popitem(last=False)

    # --- the loader thread ---------------------------------------------------------------

    def _bring_to_device(self, language: str, spilled: PackWeights | None) -> None:
        start = time.perf_counter()
        source = "host" if spilled is not None else "disk"
        try:
            pack = spilled.to(self.device) if spilled is not None else self._load_from_disk(language)
        except Exception as err:  # a bad pack must not take the engine down
            reason = str(err) if isinstance(err, ModserveError) else f"{type(err).__name__}: {err}"
            log.error("pack %s refused: %s", language, reason)
            with self._lock:
                self._loading.pop(language, None)
                self._failed[language] = (time.monotonic(), reason)
            self.observer.pack_load_failed(language, reason)
        else:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            with self._lock:
                self._loading.pop(language, None)
                self._device[language] = pack
            self.observer.pack_loaded(language, source, time.perf_counter() - start)
        if self.wakeup is not None:
            self.wakeup.set()

    def _load_from_disk(self, language: str) -> PackWeights:
        manifest, tensors = load_verified_pack(self.paths[language], self.resident, language)
        layers = {i: layer_weights(tensors, i, self.device, self.dtype) for i in manifest.layers}
        outer = None
        if manifest.non_layer_tensors:
            outer = outer_weights(tensors, self.args, self.device, self.dtype)
        return PackWeights(language, layers, outer)

    # --- reporting -------------------------------------------------------------------------

    def tier(self, language: str) -> str:
        with self._lock:
            if language in self._device:
                return "device"
            return "host" if language in self._host else "disk"

    def stats(self) -> tuple[dict[str, int], dict[str, int]]:
        """(packs per tier, bytes per tier)."""
        with self._lock:
            device, host = set(self._device), set(self._host)
        disk = set(self.paths) - device - host
        tiers = {"device": device, "host": host, "disk": disk}
        counts = {tier: len(langs) for tier, langs in tiers.items()}
        sizes = {tier: sum(self.sizes[lang] for lang in langs) for tier, langs in tiers.items()}
        return counts, sizes

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
