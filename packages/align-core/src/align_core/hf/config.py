"""Hugging Face ``config.json`` ↔ `ModelConfig`, for the Llama family of causal LMs.

Supported ``model_type`` values and what they add to Llama:

========  =====================================================================
llama     GQA, tied or untied embeddings, ``attention_bias`` + ``mlp_bias``
          (both or neither), ``rope_scaling`` of type ``llama3``
mistral   Llama without biases; ``sliding_window`` only at or above the context
qwen2     bias on q/k/v only (``qkv_bias``)
qwen3     per-head q/k RMSNorm (``qk_layernorm``), explicit ``head_dim``
========  =====================================================================

Both transformers 4.x (``rope_theta`` and ``rope_scaling`` at the top level, ``torch_dtype``) and
5.x (``rope_parameters``, ``dtype``) spellings are read. A value that would change the model in a
way `ModelConfig` cannot express raises `HFFormatError` naming ``config.json`` and the key; it is
never ignored. All functions here are pure.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from align_core.config import ModelConfig
from align_core.hf.errors import HFFormatError

__all__ = [
    "ARCHITECTURES",
    "checkpoint_dtype",
    "hf_config_from_model",
    "model_config_from_hf",
]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""``model_type`` → the ``architectures`` entry transformers writes for it."""

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _require(config: Mapping[str, Any], key: str, origin: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HFFormatError(f"{origin}: {key} must be a positive integer, got {value!r}")
    return value


def checkpoint_dtype(config: Mapping[str, Any], *, origin: str = "config.json") -> torch.dtype:
    """The dtype the weights are stored in (``dtype``, or transformers 4's ``torch_dtype``).

    Defaults to float32 when the config names none, as transformers does.

    Raises:
        HFFormatError: For a dtype other than float32, bfloat16 or float16.
    """
    name = config.get("dtype", config.get("torch_dtype")) or "float32"
    name = str(name).removeprefix("torch.")
    if name not in _DTYPES:
        raise HFFormatError(f"{origin}: dtype {name!r} is not supported ({', '.join(_DTYPES)})")
    return _DTYPES[name]


def _rope(config: Mapping[str, Any], origin: str) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and the scaling section, from either transformers spelling."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, Mapping):
        theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling: Any = dict(parameters)
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise HFFormatError(f"{origin}: rope_scaling must be a mapping, got {scaling!r}")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in (None, "default"):
            scaling = None
        elif kind != "llama3":
            raise HFFormatError(
                f"{origin}: rope_scaling type {kind!r} is not supported (default, llama3)"
            )
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise HFFormatError(f"{origin}: rope_theta must be a positive number, got {theta!r}")
    return float(theta), None if scaling is None else dict(scaling)


def _llama3_fields(scaling: Mapping[str, Any], origin: str) -> dict[str, Any]:
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise HFFormatError(f"{origin}: rope_scaling (llama3) lacks {missing}")
    return {
        "rope_scaling": True,
        "rope_scaling_factor": float(scaling["factor"]),
        "rope_scaling_low_freq_factor": float(scaling["low_freq_factor"]),
        "rope_scaling_high_freq_factor": float(scaling["high_freq_factor"]),
        "rope_scaling_original_max_position_embeddings": int(
            scaling["original_max_position_embeddings"]
        ),
    }


def _biases(config: Mapping[str, Any], model_type: str, origin: str) -> dict[str, bool]:
    if model_type == "qwen2":
        return {"bias": False, "qkv_bias": True}
    if model_type == "mistral":
        return {"bias": False, "qkv_bias": False}
    attention = bool(config.get("attention_bias", False))
    mlp = bool(config.get("mlp_bias", False)) if model_type == "llama" else attention
    if attention != mlp:
        raise HFFormatError(
            f"{origin}: attention_bias={attention} with mlp_bias={mlp} is not supported (the "
            "model's linear layers have biases all or none; Qwen2-style q/k/v-only bias is "
            "model_type qwen2)"
        )
    return {"bias": attention, "qkv_bias": False}


def _sliding_window(config: Mapping[str, Any], context: int, origin: str) -> None:
    window = config.get("sliding_window")
    if window is None or config.get("use_sliding_window", True) is False:
        return
    if not isinstance(window, int) or window < context:
        raise HFFormatError(
            f"{origin}: sliding_window={window!r} is below max_position_embeddings={context}; "
            "align attends over the whole sequence, so the model would differ beyond "
            f"{window} tokens (set sliding_window to null to accept full attention)"
        )


def model_config_from_hf(config: Mapping[str, Any], *, origin: str = "config.json") -> ModelConfig:
    """The `ModelConfig` of a Hugging Face causal-LM ``config.json``.

    The result is fp32 (align trains in fp32 on CPU; `checkpoint_dtype` gives the stored dtype),
    its ``vocab_size`` is the checkpoint's, and ``make_vocab_size_divisible_by`` is 1 (the
    vocabulary is never padded; `HFCheckpoint.model_config_for` adapts it to tensor parallelism).

    Args:
        config: The parsed ``config.json``.
        origin: Name of the file, for error messages.

    Raises:
        HFFormatError: For an unsupported ``model_type``, a missing or invalid size, or a value
            the model cannot express (the message names the key).
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFFormatError(
            f"{origin}: model_type {model_type!r} is not supported ({', '.join(ARCHITECTURES)})"
        )
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise HFFormatError(f"{origin}: hidden_act {activation!r} is not supported (silu)")
    heads = _require(config, "num_attention_heads", origin)
    hidden = _require(config, "hidden_size", origin)
    groups = config.get("num_key_value_heads") or heads
    if not isinstance(groups, int) or groups <= 0 or heads % groups:
        raise HFFormatError(
            f"{origin}: num_key_value_heads={groups!r} does not divide num_attention_heads={heads}"
        )
    head_dim = config.get("head_dim") or hidden // heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise HFFormatError(f"{origin}: head_dim must be a positive integer, got {head_dim!r}")
    if config.get("head_dim") is None and hidden % heads:
        raise HFFormatError(
            f"{origin}: hidden_size={hidden} is not divisible by num_attention_heads={heads} "
            "and head_dim is not set"
        )
    context = _require(config, "max_position_embeddings", origin)
    _sliding_window(config, context, origin)
    theta, scaling = _rope(config, origin)
    rotary_percent = float(config.get("partial_rotary_factor", 1.0))
    if not 0 < rotary_percent <= 1:
        raise HFFormatError(f"{origin}: partial_rotary_factor={rotary_percent} is not in (0, 1]")
    return ModelConfig(
        num_layers=_require(config, "num_hidden_layers", origin),
        hidden_size=hidden,
        ffn_hidden_size=_require(config, "intermediate_size", origin),
        num_attention_heads=heads,
        vocab_size=_require(config, "vocab_size", origin),
        seq_length=context,
        num_query_groups=groups,
        kv_channels=head_dim,
        position_embedding_type="rope",
        rotary_base=theta,
        rotary_percent=rotary_percent,
        **(_llama3_fields(scaling, origin) if scaling is not None else {}),
        normalization="RMSNorm",
        layernorm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        **_biases(config, model_type, origin),
        qk_layernorm=model_type == "qwen3",
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=1,
        hidden_dropout=0.0,
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        init_method_std=float(config.get("initializer_range", 0.02)),
        dtype="fp32",
    )


def _model_type(model: ModelConfig) -> str:
    if model.qk_layernorm:
        return "qwen3"
    if model.qkv_bias and not model.bias:
        return "qwen2"
    return "llama"


def _expressible(model: ModelConfig) -> None:
    problems = []
    if model.normalization != "RMSNorm":
        problems.append(f"normalization {model.normalization!r} (RMSNorm)")
    if model.activation not in ("swiglu", "fast-swiglu"):
        problems.append(f"activation {model.activation!r} (swiglu)")
    if model.position_embedding_type != "rope":
        problems.append(f"position_embedding_type {model.position_embedding_type!r} (rope)")
    if model.qk_layernorm and model.bias:
        problems.append("qk_layernorm with bias (Qwen3 has none)")
    if problems:
        raise HFFormatError(
            "the model cannot be written as a Hugging Face Llama/Qwen checkpoint: "
            + "; ".join(problems)
        )


def hf_config_from_model(
    model: ModelConfig,
    *,
    dtype: torch.dtype,
    base: Mapping[str, Any] | None = None,
    special_tokens: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a model with architecture ``model``.

    With ``base`` (the ``config.json`` the model was imported from) every key of ``base`` is
    kept and only the dtype is set, so the original architecture name and values survive;
    ``model`` must still describe the same architecture. Without it a ``LlamaForCausalLM``
    (``Qwen2ForCausalLM`` for q/k/v-only biases, ``Qwen3ForCausalLM`` for q/k norms) config is
    written in transformers 5's spelling.

    Args:
        model: The architecture.
        dtype: The dtype the weights are written in.
        base: The source ``config.json``, if the model came from one.
        special_tokens: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` for a new config.

    Raises:
        HFFormatError: When ``model`` cannot be written as one of the supported architectures,
            or differs from ``base`` in a key that shapes the weights.
    """
    name = next(k for k, v in _DTYPES.items() if v == dtype)
    if base is not None:
        imported = model_config_from_hf(base)
        mismatched = [
            f"{f}: config.json {getattr(imported, f)!r}, model {getattr(model, f)!r}"
            for f in _WEIGHT_SHAPING
            if getattr(imported, f) != getattr(model, f)
        ]
        if mismatched:
            raise HFFormatError(
                "the model differs from the config.json it came from: " + "; ".join(mismatched)
            )
        out = copy.deepcopy(dict(base))
        out["dtype" if "dtype" in out or "torch_dtype" not in out else "torch_dtype"] = name
        return out
    _expressible(model)
    model_type = _model_type(model)
    rope: dict[str, Any] = {"rope_theta": model.rotary_base, "rope_type": "default"}
    if model.rope_scaling:
        rope.update(
            rope_type="llama3",
            factor=model.rope_scaling_factor,
            low_freq_factor=model.rope_scaling_low_freq_factor,
            high_freq_factor=model.rope_scaling_high_freq_factor,
            original_max_position_embeddings=model.rope_scaling_original_max_position_embeddings,
        )
    out = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": model.kv_channels or model.hidden_size // model.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.seq_length,
        "rms_norm_eps": model.layernorm_epsilon,
        "rope_parameters": rope,
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        "attention_dropout": model.attention_dropout,
        "initializer_range": model.init_method_std,
        "use_cache": True,
        "dtype": name,
    }
    if model_type == "llama":
        out.update(attention_bias=model.bias, mlp_bias=model.bias)
    if model.rotary_percent != 1.0:
        out["partial_rotary_factor"] = model.rotary_percent
    out.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
    return out


_WEIGHT_SHAPING = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "bias",
    "qkv_bias",
    "qk_layernorm",
    "share_embeddings_and_output_weights",
)
"""`ModelConfig` fields a ``base`` config.json must agree with (vocabulary checked by shape)."""
