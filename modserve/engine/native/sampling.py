"""Next-token choice per row: greedy, or temperature / top-k / top-p with a per-request seed,
after logit_bias and penalties; and the log-probabilities a request asked for.

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
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[list[int], list[int]]],
) -> list[int]:
    """logits [B, vocab] float32, (prompt, output so far) per row -> one token id per row."""
    tokens = torch.argmax(logits, dim=-1)
    for row, p in enumerate(params):
        if p.greedy and not p.adjusts_logits:
            continue  # the batch's argmax stands
        row_logits = adjust(logits[row], p, *histories[row]) if p.adjusts_logits else logits[row]
        if p.greedy:
            tokens[row] = torch.argmax(row_logits)
        else:
            probs = torch.softmax(filter_top_k_top_p(row_logits / p.temperature, p.top_k, p.top_p), dim=-1)
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
    picked = torch.tensor([tokens[row] for row in rows], device=logits.device)
    chosen = logprobs.gather(1, picked[:, None])[:, 0].tolist()
    out: list[TokenLogprob | None] = [None] * len(params)
    for i, row in enumerate(rows):
        top = tuple(zip(top_ids[i], top_values[i], strict=True))[: params[row].logprobs]
        out[row] = TokenLogprob(tokens[row], chosen[i], top)
    return out
