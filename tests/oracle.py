"""The oracle: transformers' greedy generation on a merged checkpoint."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=16)
def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """New token ids, stopping at EOS like `generate` does."""
    with torch.inference_mode():
        out = hf_model(Path(path)).generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


def hf_logprobs(path: Path, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """float32 log-probabilities [len(generated), vocab] of the positions that chose `generated`."""
    with torch.inference_mode():
        logits = hf_model(Path(path))(torch.tensor([prompt_ids + generated])).logits[0].float()
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
