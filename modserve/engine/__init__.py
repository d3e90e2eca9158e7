"""Engines: one interface (base.Engine), a native backend and a vLLM backend."""

from __future__ import annotations

from modserve.config import ServeConfig
from modserve.engine.base import Engine


def create_engine(config: ServeConfig) -> Engine:
    """The backend `engine.backend` names, built from a validated serve config."""
    if config.model.resident is None:
        raise ValueError("resolve the demo (or model.resident) before creating an engine")
    if config.engine.backend == "vllm":
        from modserve.engine.vllm.engine import VllmEngine

        return VllmEngine.from_config(config)
    from modserve.engine.native.engine import NativeEngine, NativeEngineConfig

    return NativeEngine(NativeEngineConfig.from_config(config))
