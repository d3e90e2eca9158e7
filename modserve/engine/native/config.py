"""A Hugging Face config.json read into the native forward's `ModelArgs`, refused field by field.

Everything the forward does not implement (sliding windows, partial RoPE, other activations,
other RoPE types) is named here, before any weight is read.
"""

from __future__ import annotations

from modserve.engine.native.model import ModelArgs
from modserve.errors import ModserveError

ARCHS = ("llama", "mistral", "qwen2")


def bad(field_name: str, why: str) -> ModserveError:
    return ModserveError(f"config.json field {field_name!r}: {why}")


def model_args(config: dict) -> ModelArgs:
    arch = config.get("model_type")
    if arch not in ARCHS:
        raise bad("model_type", f"{arch!r} is not supported (native backend: {', '.join(ARCHS)})")
    refuse_unsupported(config, arch)
    max_pos = int(config.get("max_position_embeddings", 2048))
    theta, scaling = rope(config, max_pos)
    try:
        dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return ModelArgs(
            vocab_size=int(config["vocab_size"]),
            dim=dim,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or dim // n_heads),
            intermediate_size=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or (arch == "llama" and bool(config.get("attention_bias"))),
            max_position_embeddings=max_pos,
            o_bias=arch == "llama" and bool(config.get("attention_bias")),
        )
    except KeyError as err:
        raise bad(err.args[0], "missing") from None


def refuse_unsupported(config: dict, arch: str) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", f"{config['hidden_act']!r} is not supported (only silu)")
    if config.get("mlp_bias"):
        raise bad("mlp_bias", "MLP biases are not supported")
    window = config.get("sliding_window")
    if arch == "mistral" and window is not None and window < config.get("max_position_embeddings", 0):
        raise bad("sliding_window", f"sliding-window attention ({window}) is not supported")
    if arch == "qwen2" and config.get("use_sliding_window"):
        raise bad("use_sliding_window", "sliding-window attention is not supported")
    if "sliding_attention" in (config.get("layer_types") or []):
        raise bad("layer_types", "sliding-window attention layers are not supported")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise bad("partial_rotary_factor", "partial RoPE is not supported")


def rope(config: dict, max_pos: int) -> tuple[float, dict | None]:
    """(theta, scaling): transformers 5 writes rope_parameters (theta inside), 4 rope_theta + rope_scaling."""
    if isinstance(config.get("rope_parameters"), dict):
        source, params = "rope_parameters", dict(config["rope_parameters"])
    else:
        source, params = "rope_scaling", dict(config.get("rope_scaling") or {})
    if params and not any(k in params for k in ("rope_type", "type", "rope_theta", "factor")):
        raise bad(source, "per-layer-type RoPE parameters are not supported")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise bad(f"{source}.partial_rotary_factor", "partial RoPE is not supported")
    try:
        if rope_type == "default":
            return theta, None
        if rope_type == "linear":
            return theta, {"rope_type": "linear", "factor": float(params["factor"])}
        if rope_type == "llama3":
            return theta, {
                "rope_type": "llama3",
                "factor": float(params["factor"]),
                "low_freq_factor": float(params["low_freq_factor"]),
                "high_freq_factor": float(params["high_freq_factor"]),
                "original_max_position_embeddings": int(params.get("original_max_position_embeddings", max_pos)),
            }
    except KeyError as err:
        raise bad(f"{source}.{err.args[0]}", f"missing for rope_type {rope_type!r}") from None
    raise bad(f"{source}.rope_type", f"{rope_type!r} is not supported (default, linear, llama3)")
