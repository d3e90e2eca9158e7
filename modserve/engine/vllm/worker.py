"""The vLLM workers' side of the vLLM backend: packs in host memory, swapped in place.

vLLM loads `PackSwapExtension` into every worker (engine argument
`worker_extension_cls`); the engine calls its methods through `collective_rpc`. The
worker is where the weights live, so the packs are read, verified and kept there: a
swap is a host-to-device copy through vLLM's layer-wise reload, with no file written
or parsed per swap, and what is swapped in is exactly what was verified.

This module is imported inside vLLM's processes; the engine only names it (`EXTENSION`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from modserve.checkpoint import Checkpoint, layer_index
from modserve.engine.vllm.grouped import UnsupportedPackError, group_packs
from modserve.errors import ModserveError
from modserve.languages import RESIDENT
from modserve.packs.delta import exact_tensors
from modserve.packs.format import ResidentHashes, load_verified_pack

EXTENSION = f"{__name__}.PackSwapExtension"
# vLLM warns about every module a reload leaves alone; a pack leaves most alone on purpose.
PARTIAL_RELOAD_WARNINGS = ("Following weights were not loaded", "%s: Failed to load weights")
RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.inplace",
    "vllm.model_executor.model_loader.reload.layerwise",
)

Unit = tuple[int, str]  # (layer index, "") for a decoder layer; (-1, name) for a tensor outside the stack


def swap_unit(name: str) -> Unit:
    """What vLLM reloads as a whole: a decoder layer (its q/k/v and gate/up are fused), or a
    tensor outside the layer stack (embeddings, final norm, lm_head)."""
    index = layer_index(name)
    return (-1, name) if index is None else (index, "")


class PackStore:
    """Every pack's tensors, verified once, plus the resident's own copy of every unit that
    any pack replaces, so that any target can be rebuilt from any state."""

    def __init__(self, resident: Path, dtype: torch.dtype, pin: bool):
        self._resident = Checkpoint(resident)
        self._hashes = ResidentHashes(self._resident)
        self._dtype, self._pin = dtype, pin
        self._names: dict[Unit, list[str]] = {}
        for name in self._resident.names:
            self._names.setdefault(swap_unit(name), []).append(name)
        self._packs: dict[str, dict[str, torch.Tensor]] = {}
        self._resident_copies: dict[str, torch.Tensor] = {}

    def load(self, language: str, path: Path) -> int:
        """Read, verify (sha256 of every tensor, fingerprint of the resident) and keep one pack;
        returns its size in bytes. Raises ModserveError for a pack that must not serve."""
        manifest, stored = load_verified_pack(path, self._hashes, language)
        tensors = exact_tensors(manifest, stored, self._resident)  # a delta pack, materialised
        self._packs[language] = {name: self._host(tensor) for name, tensor in tensors.items()}
        for unit in self.units(language):
            for name in self._names[unit]:
                if name not in self._resident_copies:
                    self._resident_copies[name] = self._host(self._resident.get(name))
        return sum(t.numel() * t.element_size() for t in self._packs[language].values())

    def units(self, target: str) -> set[Unit]:
        return {swap_unit(name) for name in self._packs.get(target, {})}

    def weights(self, target: str, current: str | None) -> list[tuple[str, torch.Tensor]]:
        """What turns the model from `current` (None: unknown) into `target`: the target's units
        and the resident's copy of every unit the current state changed, each unit whole, in
        layer order (vLLM processes a layer as soon as all of its tensors have arrived)."""
        wanted = self.units(target)
        changed = set().union(*map(self.units, self._packs)) if current is None else self.units(current)
        pack = self._packs.get(target, {})
        return [
            (name, pack[name] if name in pack else self._resident_copies[name])
            for unit in sorted(wanted | changed)
            for name in self._names[unit]
        ]

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        """In the serving dtype (what vLLM would cast to anyway), pinned when copies go to a GPU."""
        tensor = tensor.to(self._dtype).contiguous()
        return tensor.pin_memory() if self._pin else tensor


class DropPartialReloadWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(PARTIAL_RELOAD_WARNINGS)


@contextmanager
def partial_reload_logging() -> Iterator[None]:
    quiet = DropPartialReloadWarnings()
    loggers = [logging.getLogger(name) for name in RELOAD_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class PackSwapExtension:
    """Mixed into vLLM's worker class; every method runs on every worker (tensor-parallel ranks
    each load full tensors and vLLM's weight loaders shard them, as at start-up)."""

    def modserve_load_packs(self, resident: str, packs: dict[str, str]) -> dict[str, dict]:
        """Load every pack; per language {"bytes", "seconds"} or {"error"} (the others still serve)."""
        pin = torch.device(self.model_runner.device).type == "cuda"
        self.modserve_store = PackStore(Path(resident), self.model_config.dtype, pin)
        self.modserve_current: str | None = RESIDENT  # the model holds the resident as vLLM loaded it
        reports = {}
        for language, path in packs.items():
            start = time.perf_counter()
            try:
                size = self.modserve_store.load(language, Path(path))
            except ModserveError as err:
                reports[language] = {"error": str(err)}
                continue
            reports[language] = {"bytes": size, "seconds": time.perf_counter() - start}
        return reports

    def modserve_swap(self, target: str) -> None:
        """Put `target`'s layers (a pack's language, or `resident`) into the running model in place.

        Only called while no request runs. If the reload fails halfway the state is unknown,
        and the next swap rewrites every unit any pack touches.
        """
        weights = self.modserve_store.weights(target, self.modserve_current)
        self.modserve_current = None
        with partial_reload_logging():
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        self.modserve_current = target

    def modserve_group_packs(self, resident: str, packs: dict[str, str]) -> dict:
        """pack_mode grouped: verify every pack, then run each beside the resident in every step
        (`grouped`). {"packs": per language {"bytes", "seconds"} or {"error"} (the others still
        serve), "error": why no pack can run this way, or None}."""
        from vllm.config import CompilationMode

        config = self.vllm_config
        if config.parallel_config.world_size != 1:
            return {"packs": {}, "error": "engine.pack_mode: grouped runs on one worker (tensor and pipeline parallel size 1)"}
        if config.compilation_config.mode != CompilationMode.NONE:
            return {"packs": {}, "error": "engine.pack_mode: grouped needs engine.vllm.enforce_eager: true"}
        checkpoint = Checkpoint(Path(resident))
        hashes = ResidentHashes(checkpoint)
        verified, reports = {}, {}
        for language, path in packs.items():
            start = time.perf_counter()
            try:  # as stored: a delta pack keeps its factors
                verified[language] = load_verified_pack(Path(path), hashes, language)
            except ModserveError as err:
                reports[language] = {"error": str(err)}
                continue
            size = sum(t.numel() * self.model_config.dtype.itemsize for t in verified[language][1].values())
            reports[language] = {"bytes": size, "seconds": time.perf_counter() - start}
        try:
            group_packs(self.model_runner, verified, checkpoint, self.model_config.dtype)
        except UnsupportedPackError as err:
            return {"packs": reports, "error": str(err)}
        return {"packs": reports, "error": None}
