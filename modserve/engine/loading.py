"""What every backend reads off the resident besides weights: device, dtype, tokenizer, stop ids."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from modserve.errors import ModserveError
from modserve.languages import RESIDENT

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


def chat_token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **template_options) -> list[int]:
    """The resident's chat template applied (generation prompt added by default), as token ids."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_options)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


SAMPLES, SAMPLE_BYTES = 64, 4096


def checkpoint_identity(path: Path) -> str:
    """A cheap identity of a checkpoint's weights (not a verification): every weight file's
    size, safetensors header (names, dtypes, shapes) and 64 sampled 4 KiB blocks of its
    data — two fine-tunes of one architecture share headers, never their bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            header = struct.unpack("<Q", handle.read(8))[0] if file.suffix == ".safetensors" else 0
            digest.update(handle.read(min(header, 1 << 24)))
            start = 8 + header
            for k in range(SAMPLES):
                handle.seek(start + (size - start) * k // SAMPLES)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def system_fingerprints(resident: Path, pack_contents: dict[str, str]) -> dict[str, str]:
    """OpenAI's system_fingerprint per routing target: which weights answer — the resident's
    identity and, for a pack, its content (the sha256 of its tensors, from its manifest)."""
    base = checkpoint_identity(resident)
    targets = {RESIDENT: "", **pack_contents}
    return {lang: "fp_" + hashlib.sha256(f"{base}|{content}".encode()).hexdigest()[:16] for lang, content in targets.items()}
