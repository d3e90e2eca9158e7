"""The engine interface every backend implements and the server and benchmark use.

Requests arrive as token ids with sampling parameters and a target (a pack's
language or `resident`); results stream back as text and token deltas. Nothing
here knows about HTTP, and nothing above it touches tensors.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from modserve.errors import ModserveError
from modserve.languages import RESIDENT

MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default max_logprobs
SAMPLING_EPS = 1e-5  # a temperature below this is greedy, as in vLLM
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as vLLM accepts
FinishReason = Literal["stop", "length", "abort"]


class EngineError(ModserveError):
    """A request the engine cannot take; `param` names the field at fault when there is one."""

    code = "engine_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidRequestError(EngineError):
    code = "invalid_request"


class PromptTooLongError(InvalidRequestError):
    code = "context_length_exceeded"


class QueueFullError(EngineError):
    code = "queue_full"


class EngineNotReadyError(EngineError):
    code = "not_ready"


class EngineDeadError(EngineError):
    """The engine loop is gone: nothing more will be served by this process (restart it)."""

    code = "engine_dead"


class PackUnavailableError(EngineError):
    """The pack for this language cannot be served (e.g. corrupted on disk); others still serve.
    The message is for clients: the reason, with its file paths, goes to the server log."""

    code = "pack_unavailable"

    def __init__(self, language: str):
        super().__init__(f"the {language!r} pack is unavailable: it failed to load or verify (the server log has the reason)")
        self.language = language


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text (vLLM's structured outputs), enforced token by token."""

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    spec: str = ""  # a JSON schema's text, a regex, an EBNF grammar, or the choices as a JSON list
    param: str = "response_format"  # the request field it came from, named in errors


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k likeliest
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)
    # Applied as vLLM does: logit_bias, then repetition (prompt and output tokens, HF's
    # definition), then frequency and presence (output tokens, OpenAI's definition).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # before this many, stop ids and stop strings do not end the choice
    min_p: float = 0.0  # drop tokens under min_p x the likeliest one's probability
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("seed", self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], "must fit in 64 bits (int64)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be 0 (off) or positive"),
            ("n", 1 <= self.n <= 128, "must be in [1, 128]"),
            ("stop", len(self.stop) <= 16 and all(self.stop), "at most 16 non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 100.0, "must be in (0, 100]"),
            ("logit_bias", len(self.logit_bias) <= 300 and all(-100.0 <= b <= 100.0 for _, b in self.logit_bias),
             "at most 300 tokens, biases in [-100, 100]"),
            ("min_tokens", 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens), "must be in [0, max_tokens]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
        ]
        for param, ok, why in checks:
            if not ok:
                raise InvalidRequestError(f"{param}: {why}", param=param)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or (self.presence_penalty, self.frequency_penalty, self.repetition_penalty) != (0.0, 0.0, 1.0)

    @property
    def plain_greedy(self) -> bool:
        """The batch's argmax is this row's token: nothing reshapes its logits."""
        return self.greedy and not self.adjusts_logits and not self.min_tokens and self.structured is None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = SamplingParams()
    language: str = RESIDENT


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before sampling settings), its
    rank there (1: the likeliest), and the likeliest tokens at that position, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int = 1


@dataclass
class ChoiceDelta:
    """What one choice (of `n`) produced since the last output."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for


@dataclass
class RequestOutput:
    request_id: str
    choices: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int  # so far, all choices together
    finished: bool = False
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # in the first output only; [0] is None


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    waiting_by_language: dict[str, int] = field(default_factory=dict)
    kv_tokens_used: int = 0
    kv_tokens_capacity: int = 0
    packs_by_tier: dict[str, int] = field(default_factory=dict)  # device / host / disk
    pack_bytes_by_tier: dict[str, int] = field(default_factory=dict)
    resident_bytes: int = 0


class OutputStream:
    """One request's outputs as an async iterator; closing it before the end aborts the request.

    Unlike an async generator, closing works even before the first output is read,
    so a request refused or abandoned by the server never lingers in the engine.
    """

    def __init__(self, request_id: str, abort: Callable[[str], Awaitable[None]]):
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._abort = abort
        self._done = False

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, Exception):
            self._done = True
            raise item
        self._done = item.finished
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            await self._abort(self.request_id)


class EngineObserver(Protocol):
    """Hooks the server turns into metrics; the engine never imports a metrics library."""

    def pack_loaded(self, language: str, source: str, seconds: float) -> None: ...
    def pack_load_failed(self, language: str, reason: str) -> None: ...
    def pack_swapped(self, language: str, seconds: float) -> None: ...
    def step(self, languages: int, batch_size: int) -> None: ...
    def step_failed(self) -> None: ...


class NullObserver:
    def pack_loaded(self, language: str, source: str, seconds: float) -> None:
        pass

    def pack_load_failed(self, language: str, reason: str) -> None:
        pass

    def pack_swapped(self, language: str, seconds: float) -> None:
        pass

    def step(self, languages: int, batch_size: int) -> None:
        pass

    def step_failed(self) -> None:
        pass


class InjectedFault(RuntimeError):
    """Raised on purpose by `Faults`."""


class Faults:
    """A test hook for the reliability suite: make the next engine steps raise, one request's
    rows fail (as a degenerate distribution would), or the engine loop itself die, as real
    faults would. Unarmed (the default) it does nothing."""

    def __init__(self):
        self.steps_to_fail = 0
        self.kill_loop = False
        self.poisoned: set[str] = set()  # request ids whose rows raise

    def fail_steps(self, count: int = 1) -> None:
        """Native backend (vLLM's steps run in its engine core: one that raises kills it)."""
        self.steps_to_fail += count

    def check_row(self, request_id: str) -> None:
        if request_id in self.poisoned:
            raise InjectedFault("injected row failure")

    def check_step(self) -> None:
        if self.steps_to_fail > 0:
            self.steps_to_fail -= 1
            raise InjectedFault("injected engine step failure")

    def check_loop(self) -> None:
        if self.kill_loop:
            raise InjectedFault("injected engine loop death")


class Engine(abc.ABC):
    """One resident model, packs by language, continuous batching behind an async API."""

    observer: EngineObserver = NullObserver()
    faults: Faults  # each engine makes its own
    fingerprints: dict[str, str]  # routing target -> system_fingerprint of its weights, set by start()

    @property
    @abc.abstractmethod
    def languages(self) -> list[str]:
        """Pack languages this engine serves (besides `resident`)."""

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """The resident's Hugging Face tokenizer (chat template, eos)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int: ...

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """Requests can be served: the resident is loaded and the engine loop runs."""

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """False once the engine loop died: every request then fails with EngineDeadError."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the resident and check every pack against it."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> OutputStream:
        """Queue the request and return its output stream; refusals raise EngineError here.

        Closing the stream early (client gone) aborts the request.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix, with nothing running: the bench's runs must not
        serve each other's prompts."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def check_token_ids(self, ids, param: str) -> None:
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"{param}: token ids must be in [0, {vocab})", param=param)

    def check_request(self, request: GenerationRequest) -> None:
        """Refusals common to every backend, before anything is queued."""
        if not self.alive:
            raise EngineDeadError("the engine loop died; this server must be restarted")
        if not self.ready:
            raise EngineNotReadyError("the resident model is still loading")
        if request.language != RESIDENT and request.language not in self.languages:
            raise InvalidRequestError(f"no pack for language {request.language!r}", param="language")
        prompt = len(request.prompt_token_ids)
        if prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        self.check_token_ids(request.prompt_token_ids, "prompt")
        self.check_token_ids([t for t, _ in request.params.logit_bias], "logit_bias")
        wanted = prompt + (request.params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request "
                f"has {prompt} prompt tokens and asks for {request.params.max_tokens or 1} more "
                f"({wanted} in all)"
            )
