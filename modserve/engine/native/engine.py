"""The native backend: our own forward, continuous batching, packs from the pool.

The model loop runs on one thread (torch releases the GIL in its kernels); the
asyncio side only enqueues requests and aborts and receives outputs, so the
server's event loop never waits on a forward pass.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
    QueueFullError,
    RequestOutput,
)
from modserve.engine.loading import (
    is_gguf,
    load_gguf,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    stop_token_ids,
    system_fingerprints,
)
from modserve.engine.native.cache import KVCache
from modserve.engine.native.grammar import Grammars
from modserve.engine.native.model import Group, Transformer
from modserve.engine.native.output import OutputProcessor
from modserve.engine.native.pool import PackLease, PackPool
from modserve.engine.native.sampling import make_generator
from modserve.engine.native.scheduler import Scheduler, Sequence, StepPlan
from modserve.engine.native.weights import from_checkpoint, from_tensors
from modserve.engine.text import TextStream
from modserve.errors import ModserveError
from modserve.packs.format import ResidentHashes

log = logging.getLogger(__name__)
PROMPT_SCORE_ROWS = 256


@dataclass
class NativeEngineConfig:
    resident: Path
    packs: dict[str, Path] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 32
    max_model_len: int = 4096
    max_prefill_tokens: int = 2048
    max_waiting: int = 1024
    pack_memory: int = 4 << 30
    host_pack_memory: int = 16 << 30

    @classmethod
    def from_config(cls, config: ServeConfig) -> NativeEngineConfig:
        engine = config.engine
        return cls(
            resident=config.model.resident,
            packs=dict(config.packs),
            device=config.model.device,
            dtype=config.model.dtype,
            max_batch_size=engine.max_batch_size,
            max_model_len=engine.max_model_len,
            max_prefill_tokens=engine.max_prefill_tokens,
            max_waiting=engine.max_waiting,
            pack_memory=int(engine.pack_memory),
            host_pack_memory=int(engine.host_pack_memory),
        )


@dataclass
class RequestState:
    """What the asyncio side and the model thread share about one request."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    grammar: object | None = None  # the compiled structured-output constraint (xgrammar)
    sequences: list[Sequence] = field(default_factory=list)
    queued: bool = True  # counts against max_waiting until its first sequence starts
    done: bool = False
    prompt_logprobs_posted: bool = False

    def post(self, item: RequestOutput | Exception) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)

    @property
    def all_finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    def output(self, choices: list[ChoiceDelta], finished: bool) -> RequestOutput:
        """The next output; the prompt log-probabilities ride on the first one after they are whole."""
        scorer, prompt_logprobs = self.sequences[0], None
        if scorer.prompt_logprobs is not None and not self.prompt_logprobs_posted and scorer.cached >= len(scorer.prompt):
            prompt_logprobs, self.prompt_logprobs_posted = scorer.prompt_logprobs, True
        return RequestOutput(
            request_id=self.request.request_id,
            choices=choices,
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=sum(len(s.token_ids) for s in self.sequences),
            finished=finished,
            prompt_logprobs=prompt_logprobs,
        )


class NativeEngine(Engine):
    def __init__(self, config: NativeEngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self._ready = False
        self._model: Transformer | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._requests: dict[str, RequestState] = {}
        self._waiting_requests = 0
        self._count_lock = threading.Lock()
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead = False
        self.faults = Faults()
        self.fingerprints = {}
        self._tokenizer = None
        self.pool: PackPool | None = None

    # --- Engine properties ---------------------------------------------------------------

    @property
    def languages(self) -> list[str]:
        return sorted(self.config.packs)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def ready(self) -> bool:
        return self._ready and not self._dead

    @property
    def alive(self) -> bool:
        return not self._dead

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="modserve-native", daemon=True)
        self._thread.start()
        self._ready = True

    def _load(self) -> None:
        path = Path(self.config.resident)
        if is_gguf(path):
            if self.config.packs:
                raise ModserveError(
                    "packs: a GGUF resident cannot be fingerprinted against packs; "
                    "serve packs with the safetensors checkpoint they were built from"
                )
            config, tensors, self._tokenizer = load_gguf(path)
            dtype = resolve_dtype(self.config.dtype, config)
            self._model = from_tensors(config, tensors, self.device, dtype)
            resident_hashes = None
        else:
            resident = Checkpoint(path)
            config = resident.config
            dtype = resolve_dtype(self.config.dtype, config)
            self._tokenizer = load_tokenizer(path)
            self._model = from_checkpoint(resident, self.device, dtype)
            resident_hashes = ResidentHashes(resident)
        self._stop_ids = stop_token_ids(path if path.is_dir() else path.parent, config, self._tokenizer)
        args = self._model.args
        max_len = min(self.config.max_model_len, args.max_position_embeddings)
        self.config.max_model_len = max_len
        self._cache = KVCache(args, self.config.max_batch_size, max_len, self.device, dtype)
        self.pool = PackPool(
            self.config.packs, resident_hashes, args, self.device, dtype,
            self.config.pack_memory, self.config.host_pack_memory, self.observer,
        )
        self.pool.wakeup = self._wakeup
        self.scheduler = Scheduler(self.pool, self.config.max_batch_size, self.config.max_prefill_tokens)
        self.output = OutputProcessor(max_len, self.faults)
        self.grammars = Grammars(self._tokenizer, args.vocab_size, self._stop_ids)
        self.fingerprints = system_fingerprints(path, {lang: m.content_sha256 for lang, m in self.pool.manifests.items()})
        for language in self.languages:  # warm the device tier while the budget allows
            if isinstance(lease := self.pool.acquire(language), PackLease):
                lease.release()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.pool is not None:
            self.pool.close()
        for state in list(self._requests.values()):
            state.post(EngineNotReadyError("the server is shutting down"))
        self._ready = False

    # --- the asyncio side ----------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> OutputStream:
        self.check_request(request)
        constraint = request.params.structured
        grammar = None if constraint is None else self.grammars.compile(constraint)  # a bad one is a 400
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running", param="request_id")
        with self._count_lock:
            if self._waiting_requests >= self.config.max_waiting:
                raise QueueFullError(f"{self._waiting_requests} requests are already waiting; retry later")
            self._waiting_requests += 1
        stream = OutputStream(request.request_id, self.abort)
        state = RequestState(request, asyncio.get_running_loop(), stream.queue, grammar)
        self._requests[request.request_id] = state
        self._inbox.put(("add", state))
        self._wakeup.set()
        if self._dead:  # the loop died after the check above: nothing will read the inbox
            self._requests.pop(request.request_id, None)
            state.post(EngineDeadError("the engine loop died; this server must be restarted"))
        return stream

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    async def reset_prefix_cache(self) -> None:
        """Nothing to forget: a sequence's cached KV ends with its request."""

    def stats(self) -> EngineStats:
        """A snapshot read from the asyncio side; counts may be one step stale."""
        running = self.scheduler.slotted if self._ready else []
        by_language: dict[str, int] = {}
        for state in list(self._requests.values()):
            if state.queued:
                lang = state.request.language
                by_language[lang] = by_language.get(lang, 0) + 1
        tiers, sizes = self.pool.stats() if self.pool else ({}, {})
        return EngineStats(
            running=len({s.request.request_id for s in running}),
            waiting=sum(by_language.values()),
            waiting_by_language=by_language,
            kv_tokens_used=sum(s.cached for s in running),
            kv_tokens_capacity=self.config.max_batch_size * self.config.max_model_len,
            packs_by_tier=tiers,
            pack_bytes_by_tier=sizes,
            resident_bytes=self._model.nbytes() if self._model else 0,
        )

    # --- the model thread ----------------------------------------------------------------

    def _run(self) -> None:
        """The model loop. A failing step fails its batch and the loop goes on; should the loop
        itself die, every request is answered at once and the engine reports itself dead."""
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self.faults.check_loop()
                    self._drain_inbox()
                    try:
                        self.faults.check_step()
                        worked = self._step()
                    except Exception as err:  # e.g. out of memory: fail the batch, keep serving
                        log.exception("model step failed")
                        self.observer.step_failed()
                        self._fail_batch(EngineError(f"generation failed: {type(err).__name__}"))
                        worked = True
                    if not worked:
                        self._wakeup.wait(timeout=0.5)
                        self._wakeup.clear()
        except BaseException:
            log.critical("the native engine loop died; every request now fails until a restart", exc_info=True)
            self._die()

    def _die(self) -> None:
        self._dead = True
        for state in list(self._requests.values()):
            state.done = True
            state.post(EngineDeadError("the engine loop died; this server must be restarted"))
        self._requests.clear()

    def _fail_batch(self, err: EngineError) -> None:
        """Every request with a sequence in the batch fails; its cache slots and packs are freed."""
        ids = {seq.request.request_id for seq in self.scheduler.slotted}
        for request_id in ids:
            state = self._requests.get(request_id)
            if state is not None and not state.done:
                self._fail_request(state, err)

    def _drain_inbox(self) -> None:
        """Arrivals and aborts, each on its own: one that fails fails its request alone."""
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                if kind == "add":
                    self._enqueue(item)
                else:
                    self._abort(item)
            except Exception:
                log.exception("could not %s a request", kind)
                state = item if kind == "add" else self._requests.get(item)
                if state is not None and not state.done:
                    self._fail_request(state, EngineError("the request could not be queued"))

    def _enqueue(self, state: RequestState) -> None:
        request, params = state.request, state.request.params
        stop_ids = frozenset((() if params.ignore_eos else self._stop_ids) + params.stop_token_ids)
        for index in range(params.n):
            seq = Sequence(
                request=request,
                index=index,
                text=TextStream(self._tokenizer, request.prompt_token_ids, params.stop),
                generator=make_generator(params, index, self.device),
                arrival=next(self._arrivals),
                stop_ids=stop_ids,
                grammar=None if state.grammar is None else self.grammars.matcher(state.grammar),
            )
            state.sequences.append(seq)
            self.scheduler.add(seq)

    def _abort(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is None or state.done:
            return
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        self._finish_request(state, [ChoiceDelta(s.index, "", [], "abort") for s in state.sequences])

    def _step(self) -> bool:
        """Plan, then apply: cache moves, prefill chunks, decode rows, outputs. False: idle."""
        plan = self.scheduler.schedule()
        for seq, err in plan.refused:
            state = self._requests.get(seq.request.request_id)
            if state is not None and not state.done:
                self._fail_request(state, err)
        if plan.moves[0]:
            self._cache.move(*plan.moves, plan.move_length)
        if plan.prefill:
            self._prefill(plan)
        if plan.decode:
            self._decode(plan)
        return not plan.empty

    def _prefill(self, plan: StepPlan) -> None:
        """Cache this step's prompt chunks; sequences whose prompt is now whole get their first token."""
        chunks = plan.prefill
        scoring = frozenset(row for row, c in enumerate(chunks) if c.seq.wants_prompt_logprobs)
        result = self._model.prefill(
            torch.tensor([t for c in chunks for t in c.seq.prompt[c.seq.cached : c.seq.cached + c.size]], device=self.device),
            [c.seq.cached for c in chunks],
            [c.size for c in chunks],
            [c.seq.slot for c in chunks],
            self._cache,
            plan.prefill_groups,
            keep_hidden=scoring,
        )
        for row in scoring:
            self._score_prompt(chunks[row].seq, chunks[row].seq.cached, result.hidden[row])
        for chunk in chunks:
            self._dequeue(self._requests.get(chunk.seq.request.request_id))
        done = self.scheduler.prefilled(chunks)
        if done:
            rows = [row for row, chunk in enumerate(chunks) if chunk.seq in done]
            self._emit([chunks[row].seq for row in rows], result.logits[rows])

    def _score_prompt(self, seq: Sequence, start: int, hidden: torch.Tensor) -> None:
        """Prompt log-probabilities from a chunk's hidden states, PROMPT_SCORE_ROWS at a time (a
        vocabulary-wide row of logits per token would not fit for long prompts)."""
        outer = seq.lease.weights.outer if seq.lease else None
        for offset in range(0, hidden.shape[0], PROMPT_SCORE_ROWS):
            rows = hidden[offset : offset + PROMPT_SCORE_ROWS]
            logits = self._model.head(rows, [Group(0, rows.shape[0], {}, outer)])
            self.output.prompt_logprobs(seq, start + offset, logits)

    def _dequeue(self, state: RequestState | None) -> None:
        """The request stops counting against max_waiting (first sequence started, or gone)."""
        if state is not None and state.queued:
            state.queued = False
            with self._count_lock:
                self._waiting_requests -= 1

    def _decode(self, plan: StepPlan) -> None:
        rows = plan.decode
        tokens = torch.tensor([s.token_ids[-1] for s in rows], device=self.device)
        positions = torch.tensor([s.cached for s in rows], device=self.device)
        self.observer.step(len(plan.decode_groups), len(rows))
        logits = self._model.decode(tokens, positions, self._cache, plan.decode_groups)
        for seq in rows:
            seq.cached += 1
        self._emit(rows, logits)

    def _emit(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Each row's next token out to its request; finished sequences leave the batch, and a
        row that failed fails its request alone."""
        step = self.output.process(sequences, logits)
        for seq in step.finished:
            self.scheduler.finish(seq)
        for seq, err in step.failed:
            log.error("request %s: choice %d failed: %r", seq.request.request_id, seq.index, err)
            state = self._requests.get(seq.request.request_id)
            if state is not None and not state.done:
                self._fail_request(state, EngineError(f"generation failed for this request: {type(err).__name__}"))
        for request_id, choices in step.deltas.items():
            state = self._requests.get(request_id)
            if state is None or state.done:
                continue
            if state.all_finished:
                self._finish_request(state, choices)
            else:
                state.post(state.output(choices, finished=False))

    def _finish_request(self, state: RequestState, choices: list[ChoiceDelta]) -> None:
        self._release(state)
        state.post(state.output(choices, finished=True))

    def _fail_request(self, state: RequestState, err: Exception) -> None:
        self._release(state)
        state.post(err)

    def _release(self, state: RequestState) -> None:
        state.done = True
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        self._dequeue(state)
        self._requests.pop(state.request.request_id, None)
