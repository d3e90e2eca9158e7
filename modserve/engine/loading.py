"""What every backend reads off the resident besides weights: device, dtype, tokenizer, stop ids."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modserve.errors import ModserveError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModserveError(f"model.device: {name!r} asked for, but no CUDA device is available")
    return device


def resolve_dtype(name: str, config: dict) -> torch.dtype:
    """`auto` serves in the checkpoint's own dtype."""
    if name == "auto":
        name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    try:
        return DTYPES[name]
    except KeyError:
        raise ModserveError(f"model.dtype: {name!r} is not one of auto, {', '.join(DTYPES)}") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModserveError(f"{path}: no usable tokenizer ({err})") from None


def stop_token_ids(path: Path, config: dict, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, config.json and the tokenizer."""
    ids: set[int] = set()
    generation = Path(path) / "generation_config.json"
    sources = [config.get("eos_token_id")]
    if generation.is_file():
        sources.append(json.loads(generation.read_text()).get("eos_token_id"))
    sources.append(tokenizer.eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))


def is_gguf(path: Path) -> bool:
    return Path(path).suffix == ".gguf"


def load_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], object]:
    """Config, dequantized HF-named tensors and tokenizer of a GGUF file, via transformers' reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ModserveError(f"model.resident: {path} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as err:
        raise ModserveError(f"{path}: not a GGUF file transformers can read ({err})") from None
    return model.config.to_dict(), dict(model.state_dict()), tokenizer


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The resident's chat template applied, generation prompt added, as token ids."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
