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
from modserve.engine.native.sampling import next_token, token_logprob
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

    def advance(self, seq: Sequence, logits: torch.Tensor, argmax: int) -> ChoiceDelta:
        self.faults.check_row(seq.request.request_id)
        p = seq.request.params
        plain_greedy = p.greedy and not p.adjusts_logits
        token = argmax if plain_greedy else next_token(logits, p, seq.generator, seq.prompt, seq.token_ids)
        logprob = None if p.logprobs is None else [token_logprob(logits, token, p.logprobs)]
        seq.token_ids.append(token)
        limit = p.max_tokens or self.max_model_len
        length_reached = len(seq.token_ids) >= limit or seq.cached + 1 >= self.max_model_len
        text, reason = seq.text.advance(token, seq.stop_ids, length_reached)
        return ChoiceDelta(seq.index, text, [token], reason, logprob)
