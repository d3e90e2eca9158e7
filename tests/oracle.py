"""The oracle: transformers' greedy generation on a merged checkpoint."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=16)
def hf_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """New token ids, stopping at EOS like `generate` does."""
    with torch.inference_mode():
        out = hf_model(Path(path)).generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


def hf_adjusted_greedy(
    path: Path,
    prompt_ids: list[int],
    max_new_tokens: int,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: tuple[tuple[int, float], ...] = (),
) -> list[int]:
    """Greedy, step by step without a cache or EOS, in vLLM's order: logit_bias, repetition
    (transformers' own processor), then OpenAI's frequency and presence penalties."""
    from transformers import RepetitionPenaltyLogitsProcessor

    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            ids = torch.tensor([prompt_ids + out])
            logits = hf_model(Path(path))(ids).logits[:, -1].float()  # [1, V]
            for token, bias in logit_bias:
                logits[0, token] += bias
            logits = RepetitionPenaltyLogitsProcessor(repetition_penalty)(ids, logits)
            for token in set(out):
                logits[0, token] -= frequency_penalty * out.count(token) + presence_penalty
            out.append(int(logits.argmax()))
    return out


def hf_logprobs(
    path: Path, prompt_ids: list[int], generated: list[int], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> torch.Tensor:
    """float32 log-probabilities [len(generated), vocab] of the positions that chose `generated`
    (teacher-forced: the model reads `generated`, whatever it would have chosen itself)."""
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids + generated], device=device)
        logits = hf_model(Path(path), dtype, device)(ids).logits[0].float().cpu()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


def stop_string_in(text: str) -> tuple[str, int]:
    """A two-character stop string first found past the start of `text`, and where it is.

    Random-weight models emit arbitrary bytes: skip replacement characters, which
    stand for bytes rather than text.
    """
    for k in range(1, len(text) - 1):
        candidate = text[k : k + 2]
        if "\ufffd" not in candidate and text.find(candidate) == k:
            return candidate, k
    raise AssertionError(f"no usable stop string in {text!r}")
