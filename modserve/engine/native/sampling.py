"""One row's next token: greedy, or temperature / top-k / top-p with a per-request seed,
after logit_bias and penalties; and the log-probabilities a request asked for.

Each sampled row draws from its own generator, so a seeded request gets the same tokens
whatever else shares its batch. Every function works on one row, so one row's failure
(a degenerate distribution, say) is that row's alone.
"""

from __future__ import annotations

import torch

from modserve.engine.base import SamplingParams, TokenLogprob

SEED_SPACE = 2**64  # torch.Generator seeds; int64 seeds (and seed + choice) wrap into it


def make_generator(params: SamplingParams, choice: int, device: torch.device) -> torch.Generator | None:
    """Seeded requests get their own generator (choice i of n uses seed + i); others share torch's."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed((params.seed + choice) % SEED_SPACE)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k, outside the smallest top-p nucleus, and
    under min_p x the likeliest one's probability; the likeliest token always stays."""
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def adjust(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One row's logits after logit_bias and the penalties, in vLLM's order (a new tensor)."""
    logits = logits.clone()
    for token, bias in p.logit_bias:
        logits[token] += bias
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*prompt, *output}), device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if output and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1])
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    # A tiny repetition_penalty (vLLM accepts any > 0) divides logits into infinity: keep the
    # order, and a distribution softmax can read.
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def next_token(
    logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None, prompt: list[int], output: list[int]
) -> int:
    """logits [V] float32 of one row -> its next token id."""
    row = adjust(logits, p, prompt, output) if p.adjusts_logits else logits
    if p.greedy:
        return int(torch.argmax(row))
    probs = torch.softmax(filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p, p.min_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The chosen token's log-probability under the raw logits [V], and the k likeliest."""
    return token_logprobs(logits[None], [token], k)[0]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """The same for m rows at once: logits [m, V] float32, one token per row."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])  # [m, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    values, ids = torch.topk(logprobs, k) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top = zip(ids.tolist(), values.tolist(), strict=True)
    return [
        TokenLogprob(token, value, tuple(zip(row_ids, row_values, strict=True)), rank)
        for token, value, rank, (row_ids, row_values) in zip(tokens, chosen[:, 0].tolist(), ranks.tolist(), top, strict=True)
    ]
