"""Structured outputs for the native backend: xgrammar (the engine vLLM uses) as a per-row mask.

Each constraint is compiled once (xgrammar caches compilations); each sequence gets its own
matcher, which masks the tokens that would leave the grammar before its row is sampled, and
accepts the token chosen. Rows without a constraint pay nothing, so a mixed-language batch
can hold any mix of constrained and free rows.
"""

from __future__ import annotations

import torch
import xgrammar as xgr

from modserve.engine.base import StructuredOutput
from modserve.engine.structured import grammar_of


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size

    def compile(self, constraint: StructuredOutput) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(grammar_of(constraint))

    def matcher(self, compiled: xgr.CompiledGrammar) -> RowGrammar:
        return RowGrammar(xgr.GrammarMatcher(compiled), self.vocab_size)


class RowGrammar:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int):
        self.matcher = matcher
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """logits [V] (float32, a copy): tokens the grammar forbids next become -inf."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits[None], self.bitmask.to(logits.device))

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} breaks the grammar")

    @property
    def done(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return self.matcher.is_terminated()
