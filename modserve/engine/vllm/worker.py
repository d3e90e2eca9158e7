"""The vLLM workers' side of the vLLM backend: packs in host memory, swapped in place.

vLLM loads `PackSwapExtension` into every worker (engine argument
`worker_extension_cls`); the engine calls its methods through `collective_rpc`. The
worker is where the weights live, so the packs are read, verified and kept there: a
swap is a host-to-device copy through vLLM's layer-wise reload, with no file written
or parsed per swap, and what is swapped in is exactly what was verified.

`engine.pack_mode: grouped` loads the model through `GroupedPacksLoader` instead: the packs
join the model as it loads, before vLLM compiles it.

This module is imported inside vLLM's processes; the engine only names it
(`startup.EXTENSION`, `startup.GROUPED_LOAD_FORMAT`). Importing it registers the loader.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from vllm.model_executor.model_loader import DefaultModelLoader, register_model_loader

from modserve.checkpoint import Checkpoint, layer_index
from modserve.engine.vllm.grouped import StepLanguages, UnsupportedPackError, group_packs
from modserve.engine.vllm.startup import GROUPED_LOAD_FORMAT
from modserve.errors import ModserveError
from modserve.languages import RESIDENT
from modserve.packs.delta import exact_tensors
from modserve.packs.format import ResidentHashes, load_verified_pack

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

    def modserve_start_grouping(self) -> dict:
        """pack_mode grouped: what the loader made of the packs, {"packs": per language {"bytes",
        "seconds"} or {"error"} (the others still serve), "error": why no pack can run this way,
        or None}; from now on each step's rows go to their languages' layers."""
        grouping = self.model_runner.get_model().modserve_grouping
        if grouping.languages is not None:
            grouping.languages.bind(self.model_runner)
        return {"packs": grouping.packs, "error": grouping.error}


@dataclass
class Grouping:
    """What `GroupedPacksLoader` did with the packs, kept on the model for the engine to ask."""

    packs: dict  # per language {"bytes", "seconds"} or {"error"}
    error: str | None = None  # why no pack can run this way (one worker is checked before vLLM starts)
    languages: StepLanguages | None = None


@register_model_loader(GROUPED_LOAD_FORMAT)
class GroupedPacksLoader(DefaultModelLoader):
    """vLLM's safetensors loader, then every pack verified and run beside the resident in each
    layer it swaps (`grouped`): wrapped before vLLM compiles the model, so its graph calls them."""

    def __init__(self, load_config):
        own = copy.copy(load_config)
        extra = dict(load_config.model_loader_extra_config)
        if GROUPED_LOAD_FORMAT not in extra:
            raise ValueError(f"load_format {GROUPED_LOAD_FORMAT} is modserve's own: set engine.pack_mode: grouped instead")
        self._spec = extra.pop(GROUPED_LOAD_FORMAT)
        own.model_loader_extra_config, own.load_format = extra, "safetensors"
        super().__init__(own)

    def load_model(self, vllm_config, model_config, prefix: str = "") -> torch.nn.Module:
        model = super().load_model(vllm_config, model_config, prefix)
        model.modserve_grouping = self._group(model, vllm_config, model_config.dtype)
        # vLLM keys the compiled graphs it keeps on disk by its config, which does not see what
        # the packs wrapped: this process (the engine core's) compiles afresh and keeps nothing.
        os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
        return model

    def _group(self, model: torch.nn.Module, vllm_config, dtype: torch.dtype) -> Grouping:
        checkpoint = Checkpoint(Path(self._spec["resident"]))
        hashes = ResidentHashes(checkpoint)
        verified, reports = {}, {}
        for language, path in self._spec["packs"].items():
            start = time.perf_counter()
            try:  # as stored: a delta pack keeps its factors
                verified[language] = load_verified_pack(Path(path), hashes, language)
            except ModserveError as err:
                reports[language] = {"error": str(err)}
                continue
            reports[language] = {"seconds": time.perf_counter() - start}
        try:
            languages, held = group_packs(model, verified, checkpoint, dtype, vllm_config.device_config.device)
        except UnsupportedPackError as err:
            return Grouping(reports, str(err))
        for language, size in held.items():
            reports[language]["bytes"] = size
        return Grouping(reports, languages=languages)
