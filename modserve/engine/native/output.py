"""A step's logits to what clients see: sample → log-probabilities → detokenize → stop → deltas.

The native engine's output processor (vLLM keeps the same job apart from its scheduler):
it decides each sequence's next token and whether it finished, and says so in one
`ChoiceDelta` per sequence; the engine routes them to their requests. Each row is handled
on its own: a row that fails (sampling, log-probabilities, detokenization) fails its
sequence alone, and the rest of the batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modserve.engine.base import ChoiceDelta, Faults
from modserve.engine.native.sampling import next_token, token_logprob, token_logprobs
from modserve.engine.native.scheduler import Sequence


@dataclass
class StepOutput:
    deltas: dict[str, list[ChoiceDelta]] = field(default_factory=dict)  # request id -> its choices' deltas
    finished: list[Sequence] = field(default_factory=list)  # finish_reason set
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, max_model_len: int, faults: Faults):
        self.max_model_len, self.faults = max_model_len, faults

    def process(self, sequences: list[Sequence], logits: torch.Tensor) -> StepOutput:
        """logits [len(sequences), V] float32 -> what each sequence produced this step."""
        argmax = torch.argmax(logits, dim=-1).tolist()  # the one host sync; plain greedy rows need no more
        out = StepOutput()
        for row, seq in enumerate(sequences):
            if seq.finish_reason is not None:  # its request ended while the step ran
                continue
            try:
                delta = self.advance(seq, logits[row], argmax[row])
            except Exception as err:
                out.failed.append((seq, err))
                continue
            out.deltas.setdefault(seq.request.request_id, []).append(delta)
            if delta.finish_reason is not None:
                seq.finish_reason = delta.finish_reason
                out.finished.append(seq)
        return out

    def prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Entries for the prompt tokens a chunk's logits [n, V] predict: chunk row j (prompt
        position start + j) predicts the token at start + j + 1 (past the prompt: the first
        generated token, which is not the prompt's)."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]  # nothing predicts the first token
        predicted = seq.prompt[start + 1 : start + 1 + logits.shape[0]]
        if predicted:
            seq.prompt_logprobs += token_logprobs(logits[: len(predicted)], predicted, seq.request.params.prompt_logprobs)

    def advance(self, seq: Sequence, logits: torch.Tensor, argmax: int) -> ChoiceDelta:
        self.faults.check_row(seq.request.request_id)
        p = seq.request.params
        if p.plain_greedy:
            token = argmax
        else:
            token = next_token(self.shaped(seq, logits), p, seq.generator, seq.prompt, seq.token_ids)
        logprob = None if p.logprobs is None else [token_logprob(logits, token, p.logprobs)]  # the raw logits'
        if seq.grammar is not None:
            seq.grammar.accept(token)
        seq.token_ids.append(token)
        may_stop = len(seq.token_ids) >= p.min_tokens
        length_reached = len(seq.token_ids) >= (p.max_tokens or self.max_model_len) or seq.cached + 1 >= self.max_model_len
        text, reason = seq.text.advance(token, seq.stop_ids if may_stop else frozenset(), length_reached, may_stop)
        if reason is None and seq.grammar is not None and seq.grammar.done:
            text, reason = text + seq.text.finish(), "stop"  # the grammar ended (its stop token, even with ignore_eos)
        return ChoiceDelta(seq.index, text, [token], reason, logprob)

    @staticmethod
    def shaped(seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits with what its request forbids now masked: stop ids before min_tokens,
        tokens that would leave its grammar."""
        if len(seq.token_ids) >= seq.request.params.min_tokens and seq.grammar is None:
            return logits
        logits = logits.clone()
        if len(seq.token_ids) < seq.request.params.min_tokens and seq.stop_ids:
            logits[list(seq.stop_ids)] = float("-inf")
        if seq.grammar is not None:
            seq.grammar.mask(logits)
        return logits
