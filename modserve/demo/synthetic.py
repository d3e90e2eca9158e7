"""Seeded tiny Llama-family experts in Hugging Face layout, built offline in seconds.

Tests and the demo need a base model, a math expert and language experts that
share the base, with the layer pattern the paper finds in real fine-tunes: the
math expert moved the middle layers most, each language expert the bottom and
top layers. `analyze` must recover the planted boundaries from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from modserve.checkpoint import layer_index, write_index

Arch = Literal["llama", "mistral", "qwen2"]

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "mistral": ("MistralForCausalLM", "MistralConfig"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
}
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
    "<|reserved_0|>",
    "<|reserved_1|>",
]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
BOS_ID, EOS_ID, EOT_ID, PAD_ID = 256, 257, 260, 261
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape and storage of a tiny expert family. head_dim stays >= 32 for vLLM's CPU attention."""

    arch: Arch = "llama"
    num_layers: int = 12
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tie_embeddings: bool = False
    attention_bias: bool = False
    llama3_rope_scaling: bool = False
    max_position_embeddings: int = 2048
    shards: int = 1
    # Layers the language experts moved most: [0, planted_bottom) and [L - planted_top, L).
    planted_bottom: int = 3
    planted_top: int = 2
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class Family:
    """Paths of one base model and the experts fine-tuned from it."""

    base: Path
    math: Path
    languages: dict[str, Path] = field(default_factory=dict)


def hf_config(spec: TinySpec) -> dict:
    architecture, _ = ARCHITECTURES[spec.arch]
    config = {
        "architectures": [architecture],
        "model_type": spec.arch,
        "vocab_size": VOCAB_SIZE,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tie_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, EOT_ID],
        "pad_token_id": PAD_ID,
        "torch_dtype": spec.dtype,
        "use_cache": True,
    }
    if spec.arch == "llama":
        config["attention_bias"] = spec.attention_bias
        config["mlp_bias"] = False
    if spec.arch == "mistral":
        config["sliding_window"] = None
    if spec.arch == "qwen2":
        config["use_sliding_window"] = False
        config["sliding_window"] = None
    if spec.llama3_rope_scaling:
        config["rope_theta"] = 500000.0
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    return config


def has_qkv_bias(spec: TinySpec) -> bool:
    return spec.arch == "qwen2" or has_o_bias(spec)


def has_o_bias(spec: TinySpec) -> bool:
    """Llama's attention_bias puts a bias on o_proj too; Mistral has no such option."""
    return spec.arch == "llama" and spec.attention_bias


def base_weights(spec: TinySpec) -> dict[str, torch.Tensor]:
    """Random weights scaled so every block contributes O(1) and logits are peaked.

    Peaked logits keep greedy decoding away from near-ties, so equivalence tests
    compare tokens, not float noise.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    d, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_out, kv_out = spec.num_heads * hd, spec.num_kv_heads * hd

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) / in_features**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(d, generator=gen)

    weights = {"model.embed_tokens.weight": torch.randn(VOCAB_SIZE, d, generator=gen)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm()
        weights[p + "self_attn.q_proj.weight"] = linear(q_out, d)
        weights[p + "self_attn.k_proj.weight"] = linear(kv_out, d)
        weights[p + "self_attn.v_proj.weight"] = linear(kv_out, d)
        if has_qkv_bias(spec):
            weights[p + "self_attn.q_proj.bias"] = 0.1 * torch.randn(q_out, generator=gen)
            weights[p + "self_attn.k_proj.bias"] = 0.1 * torch.randn(kv_out, generator=gen)
            weights[p + "self_attn.v_proj.bias"] = 0.1 * torch.randn(kv_out, generator=gen)
        weights[p + "self_attn.o_proj.weight"] = linear(d, q_out)
        if has_o_bias(spec):
            weights[p + "self_attn.o_proj.bias"] = 0.1 * torch.randn(d, generator=gen)
        weights[p + "post_attention_layernorm.weight"] = norm()
        weights[p + "mlp.gate_proj.weight"] = linear(f, d)
        weights[p + "mlp.up_proj.weight"] = linear(f, d)
        weights[p + "mlp.down_proj.weight"] = linear(d, f)
    weights["model.norm.weight"] = norm()
    if not spec.tie_embeddings:
        weights["lm_head.weight"] = 3.0 * linear(VOCAB_SIZE, d)
    return weights


def fine_tune(
    base: dict[str, torch.Tensor], moved_layers: set[int], seed: int, strong: float, weak: float
) -> dict[str, torch.Tensor]:
    """base + noise whose relative size is about `strong` in `moved_layers` and `weak` elsewhere.

    Each tensor's size is jittered by ±40%, as real fine-tunes move modules unevenly.
    """
    gen = torch.Generator().manual_seed(seed)
    tuned = {}
    for name, tensor in base.items():
        layer = layer_index(name)
        scale = strong if layer is not None and layer in moved_layers else weak
        scale *= 0.6 + 0.8 * float(torch.rand((), generator=gen))
        noise = torch.randn(tensor.shape, generator=gen)
        tuned[name] = tensor + scale * noise * tensor.norm() / noise.norm()
    return tuned



def write_checkpoint(path: Path, spec: TinySpec, weights: dict[str, torch.Tensor]) -> Path:
    """A complete Hugging Face checkpoint directory: config, tokenizer, safetensors (sharded or not)."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, spec.dtype)
    weights = {name: t.to(dtype).contiguous() for name, t in weights.items()}
    (path / "config.json").write_text(json.dumps(hf_config(spec), indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, EOT_ID], "do_sample": False})
    )
    save_tokenizer(path)
    names = list(weights)
    if spec.shards <= 1:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return path
    per_shard = -(-len(names) // spec.shards)
    weight_map = {}
    for k in range(spec.shards):
        shard_name = f"model-{k + 1:05d}-of-{spec.shards:05d}.safetensors"
        chunk = {n: weights[n] for n in names[k * per_shard : (k + 1) * per_shard]}
        save_file(chunk, path / shard_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, shard_name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    write_index(path, weight_map, total)
    return path


def save_tokenizer(path: Path) -> None:
    """Byte-level tokenizer (one token per byte) with Llama-3-style specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    wrapped.save_pretrained(path)


def build_family(
    root: Path, spec: TinySpec = TinySpec(), languages: tuple[str, ...] = ("sw", "te")
) -> Family:
    """Write base/, math/ and one expert per language under `root`; same inputs, same bytes."""
    base = base_weights(spec)
    layers = range(spec.num_layers)
    outer = {i for i in layers if i < spec.planted_bottom or i >= spec.num_layers - spec.planted_top}
    middle = set(layers) - outer
    math = fine_tune(base, middle, seed=spec.seed + 1, strong=0.2, weak=0.02)
    family = Family(
        base=write_checkpoint(root / "base", spec, base),
        math=write_checkpoint(root / "math", spec, math),
    )
    for k, lang in enumerate(languages):
        tuned = fine_tune(base, outer, seed=spec.seed + 100 + k, strong=0.2, weak=0.02)
        family.languages[lang] = write_checkpoint(root / lang, spec, tuned)
    return family
