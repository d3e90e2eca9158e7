"""Log-probabilities from the engine's token ids to OpenAI's and vLLM's shapes.

Chat: one entry per token with its text, UTF-8 bytes and the top alternatives.
Completions (legacy): parallel lists, alternatives keyed by text, offsets into the text; with
echo the prompt's tokens come first, the very first with no log-probability, as OpenAI does.
vLLM's `prompt_logprobs`: per prompt token {token id: logprob, rank, decoded_token}.
Token texts are single-token decodes, as vLLM reports them: a byte-level token in the
middle of a UTF-8 character decodes to U+FFFD.
"""

from __future__ import annotations

from modserve.engine.base import Engine, TokenLogprob
from modserve.server.responses import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprobEntry,
    TopLogprob,
)


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

    def completion(
        self, logprobs: list[TokenLogprob | None], offset: int, token_ids: list[int] | None = None
    ) -> tuple[CompletionLogprobs, int]:
        """The legacy shape for tokens whose text starts at `offset`, and the offset after them.
        Entries may be None (the first prompt token): then `token_ids` names the tokens."""
        ids = token_ids or [lp.token_id for lp in logprobs]
        tokens, offsets = [], []
        for token in ids:
            tokens.append(self.text(token))
            offsets.append(offset)
            offset += len(tokens[-1])
        shaped = CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[None if lp is None else lp.logprob for lp in logprobs],
            top_logprobs=[None if lp is None else self.top_by_text(lp) for lp in logprobs],
            text_offset=offsets,
        )
        return shaped, offset

    def top_by_text(self, lp: TokenLogprob) -> dict[str, float]:
        return {self.text(t): v for t, v in lp.top}

    def prompt(self, logprobs: list[TokenLogprob | None] | None) -> PromptLogprobs | None:
        if logprobs is None:
            return None
        shaped: PromptLogprobs = []
        for lp in logprobs:
            if lp is None:
                shaped.append(None)
                continue
            entry = {str(lp.token_id): PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=self.text(lp.token_id))}
            for rank, (token, value) in enumerate(lp.top, start=1):
                entry.setdefault(str(token), PromptLogprob(logprob=value, rank=rank, decoded_token=self.text(token)))
            shaped.append(entry)
        return shaped


def merged(first: CompletionLogprobs, second: CompletionLogprobs | None) -> CompletionLogprobs:
    """The prompt's entries (echo) followed by the generated ones."""
    if second is None:
        return first
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )
