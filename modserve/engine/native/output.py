"""A step's logits to what clients see: sample → log-probabilities → detokenize → stop → deltas.

The native engine's output processor (vLLM keeps the same job apart from its scheduler):
it decides each sequence's next token and whether it finished, and says so in one
`ChoiceDelta` per sequence; the engine routes them to their requests.
"""

from __future__ import annotations

import torch

from modserve.engine.base import ChoiceDelta, FinishReason
from modserve.engine.native.sampling import sample, token_logprobs
from modserve.engine.native.scheduler import Sequence


class OutputProcessor:
    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len

    def process(self, sequences: list[Sequence], logits: torch.Tensor) -> tuple[dict[str, list[ChoiceDelta]], list[Sequence]]:
        """logits [len(sequences), V] -> per request id its choices' deltas, and the sequences
        that finished (their finish_reason set)."""
        params = [s.request.params for s in sequences]
        histories = [(s.prompt, s.token_ids) for s in sequences]
        new_tokens = sample(logits, params, [s.generator for s in sequences], histories)
        logprobs = token_logprobs(logits, params, new_tokens)
        deltas: dict[str, list[ChoiceDelta]] = {}
        finished = []
        for seq, token, logprob in zip(sequences, new_tokens, logprobs, strict=True):
            if seq.finish_reason is not None:  # its request ended while the step ran
                continue
            seq.token_ids.append(token)
            text, reason = self.advance(seq, token)
            delta = ChoiceDelta(seq.index, text, [token], reason, None if logprob is None else [logprob])
            deltas.setdefault(seq.request.request_id, []).append(delta)
            if reason is not None:
                seq.finish_reason = reason
                finished.append(seq)
        return deltas, finished

    def advance(self, seq: Sequence, token: int) -> tuple[str, FinishReason | None]:
        """Text released by this token and the finish reason it causes, if any."""
        if token in seq.stop_ids:
            return seq.text.finish(), "stop"
        text, hit_stop = seq.text.push(token)
        if hit_stop:
            return text, "stop"
        out_of_room = seq.cached + 1 >= self.max_model_len
        if len(seq.token_ids) >= (seq.request.params.max_tokens or self.max_model_len) or out_of_room:
            return text + seq.text.finish(), "length"
        return text, None
