"""Next-token choice per row: greedy, or temperature / top-k / top-p with a per-request seed.

Each sampled row draws from its own generator, so a seeded request gets the
same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from modserve.engine.base import SamplingParams, TokenLogprob


def make_generator(params: SamplingParams, choice: int, device: torch.device) -> torch.Generator | None:
    """Seeded requests get their own generator (choice i of n uses seed + i); others share torch's."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed + choice)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k and outside the smallest top-p nucleus."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keeps the top token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits [B, vocab] float32 -> one token id per row."""
    tokens = torch.argmax(logits, dim=-1)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        row_logits = filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row_logits, dim=-1)
        tokens[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    return tokens.tolist()


def token_logprobs(
    logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]
) -> list[TokenLogprob | None]:
    """Per row that asked for them, the chosen token's log-probability and the top k."""
    rows = [row for row, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return [None] * len(params)
    logprobs = torch.log_softmax(logits[rows], dim=-1)  # [R, vocab] float32
    values, ids = torch.topk(logprobs, max(params[row].logprobs for row in rows))  # k may be 0
    top_values, top_ids = values.tolist(), ids.tolist()
    chosen = logprobs[torch.arange(len(rows)), torch.tensor([tokens[row] for row in rows])].tolist()
    out: list[TokenLogprob | None] = [None] * len(params)
    for i, row in enumerate(rows):
        top = tuple(zip(top_ids[i], top_values[i], strict=True))[: params[row].logprobs]
        out[row] = TokenLogprob(tokens[row], chosen[i], top)
    return out
