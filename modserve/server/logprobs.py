"""Log-probabilities from the engine's token ids to OpenAI's two shapes.

Chat: one entry per token with its text, UTF-8 bytes and the top alternatives.
Completions (legacy): parallel lists, alternatives keyed by text, offsets into the text.
Token texts are single-token decodes, as vLLM reports them: a byte-level token in the
middle of a UTF-8 character decodes to U+FFFD.
"""

from __future__ import annotations

from modserve.engine.base import Engine, TokenLogprob
from modserve.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob


class LogprobShapes:
    def __init__(self, engine: Engine):
        self.engine = engine  # its tokenizer exists once the engine has started

    def text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    def chat(self, logprobs: list[TokenLogprob] | None) -> ChatLogprobs | None:
        if logprobs is None:
            return None
        return ChatLogprobs(
            content=[
                TokenLogprobEntry(
                    **self.top(lp.token_id, lp.logprob).model_dump(),
                    top_logprobs=[self.top(t, v) for t, v in lp.top],
                )
                for lp in logprobs
            ]
        )

    def completion(self, logprobs: list[TokenLogprob], offset: int) -> tuple[CompletionLogprobs, int]:
        """The legacy shape for tokens whose text starts at `offset`; and the offset after them."""
        tokens, offsets = [], []
        for lp in logprobs:
            tokens.append(self.text(lp.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        shaped = CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in logprobs],
            top_logprobs=[{self.text(t): v for t, v in lp.top} for lp in logprobs],
            text_offset=offsets,
        )
        return shaped, offset
