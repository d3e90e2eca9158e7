"""Hugging Face-named tensors into the native forward's weights, one tensor at a time.

Each tensor is cast and moved as it is read, so a checkpoint never sits whole in host
memory on its way to the device. Packs load through the same functions as the resident.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from modserve.checkpoint import Checkpoint
from modserve.engine.native.config import model_args
from modserve.engine.native.model import (
    DeltaLayer,
    LayerWeights,
    LowRank,
    ModelArgs,
    OuterWeights,
    Transformer,
)
from modserve.errors import ModserveError


def take(tensors: Mapping[str, Tensor], name: str, device, dtype) -> Tensor:
    try:
        tensor = tensors[name]
    except KeyError:
        raise ModserveError(f"tensor {name!r} is missing") from None
    return tensor.to(device=device, dtype=dtype).contiguous()


# LayerWeights field -> Hugging Face name inside `model.layers.N.`
LINEARS = {
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
NORMS = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight"}
BIASES = {"bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
          "bo": "self_attn.o_proj.bias"}


def layer_weights(
    tensors: Mapping[str, Tensor], layer: int, device, dtype, args: ModelArgs | None = None
) -> LayerWeights:
    """Biases are read when present; with `args` they are required exactly where args says."""
    p = f"model.layers.{layer}."

    def bias(field: str) -> Tensor | None:
        wanted = None if args is None else (args.o_bias if field == "bo" else args.qkv_bias)
        if wanted is None:
            wanted = p + BIASES[field] in tensors
        return take(tensors, p + BIASES[field], device, dtype) if wanted else None

    whole = {field: take(tensors, p + name, device, dtype) for field, name in (LINEARS | NORMS).items()}
    return LayerWeights(**whole, **{field: bias(field) for field in BIASES})


def delta_layer_weights(tensors: Mapping[str, Tensor], layer: int, device, dtype) -> DeltaLayer:
    """A delta pack's layer: factored linears (`<name>.lora_A`/`.lora_B`), whole norms and biases."""
    p = f"model.layers.{layer}."
    whole = [p + name for name in LINEARS.values() if p + name in tensors]
    if whole:
        raise ModserveError(f"delta pack: {whole[0]!r} is stored whole, not as low-rank factors")
    deltas = {
        field: LowRank(a=take(tensors, f"{p}{name}.lora_A", device, dtype), b=take(tensors, f"{p}{name}.lora_B", device, dtype))
        for field, name in LINEARS.items()
        if f"{p}{name}.lora_A" in tensors
    }
    norms = {field: take(tensors, p + name, device, dtype) for field, name in NORMS.items()}
    biases = {field: take(tensors, p + name, device, dtype) for field, name in BIASES.items() if p + name in tensors}
    return DeltaLayer(**norms, deltas=deltas, biases=biases)


def outer_weights(tensors: Mapping[str, Tensor], args: ModelArgs, device, dtype) -> OuterWeights:
    embed = take(tensors, "model.embed_tokens.weight", device, dtype)
    norm = take(tensors, "model.norm.weight", device, dtype)
    lm_head = embed if args.tie_embeddings else take(tensors, "lm_head.weight", device, dtype)
    return OuterWeights(embed=embed, norm=norm, lm_head=lm_head)


class CheckpointTensors(Mapping):
    """A Checkpoint seen as a lazy name -> tensor mapping (each get reads one tensor)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.ckpt.shard_of:
            raise KeyError(name)
        return self.ckpt.get(name)

    def __contains__(self, name) -> bool:
        return name in self.ckpt.shard_of

    def __iter__(self) -> Iterator[str]:
        return iter(self.ckpt.shard_of)

    def __len__(self) -> int:
        return len(self.ckpt.shard_of)


def from_tensors(config: dict, tensors: Mapping[str, Tensor], device, dtype) -> Transformer:
    """From a Hugging Face config dict and HF-named tensors (e.g. a dequantized GGUF)."""
    args = model_args(config)
    layers = [layer_weights(tensors, i, device, dtype, args) for i in range(args.n_layers)]
    return Transformer(args, layers, outer_weights(tensors, args, device, dtype), device, dtype)


def from_checkpoint(ckpt: Checkpoint, device, dtype: torch.dtype) -> Transformer:
    return from_tensors(ckpt.config, CheckpointTensors(ckpt), device, dtype)
