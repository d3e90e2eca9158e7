"""modserve's request and result types to vLLM's and back: sampling parameters,
log-probabilities, errors, and vLLM's per-step statistics.

vLLM is imported inside the functions: importing it takes seconds, and the server must
answer /health before the engine has started.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from modserve.engine.base import (
    EngineDeadError,
    EngineError,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)
from modserve.engine.structured import JSON_OBJECT

FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort", "repetition": "stop"}


def int64(value: int) -> int:
    """seed + choice index, wrapped into the int64 range vLLM takes."""
    return (value + 2**63) % 2**64 - 2**63


def vllm_sampling_params(
    params: SamplingParams, max_tokens: int, seed: int | None, generated: int = 0, prompt_logprobs: bool = False
):
    """Ours to vLLM's for one choice (each choice is a vLLM request of its own), streaming
    token deltas, for a submission that resumes after `generated` tokens. Stop strings are
    modserve's to find (its own text, across resumptions too), so vLLM gets none; vLLM adds
    the model's own EOS ids (generation_config)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    try:
        return VllmSamplingParams(
            n=1,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            seed=None if seed is None else int64(seed),
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            max_tokens=max_tokens - generated,
            min_tokens=max(0, params.min_tokens - generated),
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs if prompt_logprobs else None,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=dict(params.logit_bias) or None,
            structured_outputs=structured_outputs(params.structured),
            detokenize=False,  # modserve's TextStream makes the text
            output_kind=RequestOutputKind.DELTA,
        )
    except (VLLMClientError, ValueError) as err:
        raise InvalidRequestError(str(err), param=getattr(err, "parameter", None)) from None


def structured_outputs(constraint: StructuredOutput | None):
    """vLLM's StructuredOutputsParams for one of ours (vLLM compiles it with xgrammar too)."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.kind == "json_object":
        return StructuredOutputsParams(json=JSON_OBJECT)
    if constraint.kind == "json":
        return StructuredOutputsParams(json=constraint.spec)
    if constraint.kind == "choice":
        return StructuredOutputsParams(choice=json.loads(constraint.spec))
    return StructuredOutputsParams(**{constraint.kind: constraint.spec})


def vllm_logprobs(token_ids, positions, k: int) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob(logprob, rank)} (the top k plus the chosen one)."""
    out = []
    for token, alternatives in zip(token_ids, positions, strict=True):
        top = sorted((lp.rank, t, lp.logprob) for t, lp in alternatives.items() if lp.rank <= k)
        chosen = alternatives[token]
        out.append(TokenLogprob(token, chosen.logprob, tuple((t, lp) for _, t, lp in top), chosen.rank))
    return out


def engine_error(err: Exception) -> EngineError:
    """vLLM's exceptions as the API's: the request's fault (400) or the server's (500)."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

    if isinstance(err, EngineError):
        return err
    if isinstance(err, VLLMClientError | ValueError):
        return InvalidRequestError(str(err), param=getattr(err, "parameter", None))
    if isinstance(err, VllmEngineDeadError):
        return EngineDeadError("vLLM's engine core died; this server must be restarted")
    return EngineError(f"generation failed for this request: {type(err).__name__}")


class StepRecorder:
    """A per-engine vLLM stat logger (duck-typed, so this module needs no vLLM import): every
    engine step reports its batch size (to `observe_step`, which adds what the batch holds)
    and its KV-cache use (to `stats()`)."""

    def __init__(self, observe_step: Callable[[int], None]):
        self.observe_step = observe_step
        self.kv_cache_usage = 0.0

    def __call__(self, vllm_config, engine_index: int = 0) -> StepRecorder:
        return self  # vLLM calls the factory once per engine; there is one engine

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        self.kv_cache_usage = scheduler_stats.kv_cache_usage
        if scheduler_stats.num_running_reqs:
            self.observe_step(scheduler_stats.num_running_reqs)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass
