"""NeMo GPT ``model_config.yaml`` keys ↔ `ModelConfig`.

`NemoGptConfig` lists the architecture keys of NeMo's ``MegatronGPTModel`` config under their
NeMo names, with NeMo's own defaults (which differ from `ModelConfig`'s: NeMo defaults to
LayerNorm, GeLU, biases, learned positions and tied embeddings). Keys that would change the model
in ways `ModelConfig` cannot express (mixture of experts, post-LN blocks, sliding windows, ...)
are accepted only at their inert values; any other value raises `UnsupportedNemoConfigError`
naming the key. Training-only keys (optimiser, data, batch sizes,
fusions, recompute) are ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from align_core.config import ACTIVATIONS, ModelConfig
from align_core.nemo.errors import NemoFormatError, UnsupportedNemoConfigError

__all__ = [
    "NEMO_GPT_TARGET",
    "NemoGptConfig",
    "model_config_from_nemo",
    "nemo_config_from_model",
    "unwrap_model_section",
]

NEMO_GPT_TARGET = (
    "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
)

_NORMALIZATION = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
_ACTIVATION_ALIASES = {"fast-geglu": "geglu", "fast-reglu": "reglu"}
_PRECISION = (("bf16", "bf16"), ("16", "fp16"), ("32", "fp32"))
_WRITE_PRECISION = {"fp32": 32, "bf16": "bf16", "fp16": 16}

# Keys that change the architecture beyond ModelConfig, with the values that leave it unchanged.
_INERT_VALUES: dict[str, tuple[Any, ...]] = {
    "num_moe_experts": (None, 0, 1),
    "moe_layer_freq": (None, 1),
    "mtp_num_layers": (None, 0),
    "transformer_block_type": ("pre_ln",),
    "apply_residual_connection_post_layernorm": (False,),
    "layernorm_zero_centered_gamma": (False,),
    "seq_len_interpolation_factor": (None, 1, 1.0),
    "rotary_interleaved": (False,),
    "headscale": (False,),
    "normalize_attention_scores": (True,),
    "window_size": (None,),
    "multi_latent_attention": (False,),
    "megatron_legacy": (False,),
    "mcore_gpt": (True,),
    "openai_gelu": (False,),
    "attention_type": ("multihead",),
    "use_emha": (False,),
    "experimental_attention_variant": (None,),
}


@dataclass(frozen=True)
class NemoGptConfig:
    """Architecture keys of a NeMo GPT config, NeMo's names and NeMo's defaults.

    Attributes mirror the keys of ``model_config.yaml``; see `ModelConfig` for their meaning.
    ``qkv_bias`` None means "same as ``bias``". ``scale_positional_embedding`` is NeMo's switch
    for Llama 3.1 RoPE scaling (megatron-core's ``rope_scaling``) with ``rope_scaling_factor``;
    NeMo 1.x fixes the other three values at megatron-core's defaults, and align writes
    ``rope_scaling_low_freq_factor``, ``rope_scaling_high_freq_factor`` and
    ``rope_scaling_original_max_position_embeddings`` so that other values survive a round trip.
    ``tensor_model_parallel_size`` and ``pipeline_model_parallel_size`` record the layout the
    weights were saved with.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    encoder_seq_length: int
    num_query_groups: int | None = None
    kv_channels: int | None = None
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    rotary_percentage: float = 1.0
    normalization: str = "layernorm"
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"
    bias: bool = True
    qkv_bias: bool | None = None
    qk_layernorm: bool = False
    scale_positional_embedding: bool = False
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    share_embeddings_and_output_weights: bool = True
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    precision: int | str = 32
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], *, origin: str = "<nemo>") -> NemoGptConfig:
        """Parse a NeMo model config (already unwrapped from ``model:``).

        Raises:
            NemoFormatError: When a required key is missing or has the wrong type.
            UnsupportedNemoConfigError: When an architecture key has a value this package
                cannot build.
        """
        for key, inert in _INERT_VALUES.items():
            if key in cfg and cfg[key] not in inert:
                raise UnsupportedNemoConfigError(
                    f"{origin}: {key}={cfg[key]!r} is not supported (supported: "
                    f"{', '.join(repr(v) for v in inert)})"
                )
        values = dict(cfg)
        if "encoder_seq_length" not in values and "max_position_embeddings" in values:
            values["encoder_seq_length"] = values["max_position_embeddings"]
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in values and values[f.name] is not None:
                kwargs[f.name] = values[f.name]
            elif f.default is dataclasses.MISSING:
                raise NemoFormatError(f"{origin}: model_config.yaml has no {f.name!r}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            if not isinstance(kwargs[name], int) or isinstance(kwargs[name], bool):
                raise NemoFormatError(f"{origin}: {name} must be an integer, got {kwargs[name]!r}")
        return cls(**kwargs)

    def dtype(self) -> str:
        """`ModelConfig.dtype` for NeMo's ``precision`` (``bf16-mixed`` → ``"bf16"``, ...)."""
        text = str(self.precision)
        for prefix, dtype in _PRECISION:
            if text.startswith(prefix):
                return dtype
        raise UnsupportedNemoConfigError(f"precision={self.precision!r} is not supported")

    def to_model_config(self, vocab_size: int) -> ModelConfig:
        """The `ModelConfig` for these keys and a vocabulary size.

        Raises:
            UnsupportedNemoConfigError: For a normalisation, activation, position embedding or
                bias combination `ModelConfig` cannot express.
        """
        norm = _NORMALIZATION.get(self.normalization.lower())
        if norm is None:
            raise UnsupportedNemoConfigError(
                f"normalization={self.normalization!r} is not supported (layernorm, rmsnorm)"
            )
        activation = _ACTIVATION_ALIASES.get(self.activation, self.activation)
        if activation not in ACTIVATIONS:
            raise UnsupportedNemoConfigError(
                f"activation={self.activation!r} is not supported ({', '.join(ACTIVATIONS)})"
            )
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise UnsupportedNemoConfigError(
                f"position_embedding_type={self.position_embedding_type!r} is not supported "
                "(rope, learned_absolute)"
            )
        if self.bias and self.qkv_bias is not None and not self.qkv_bias:
            raise UnsupportedNemoConfigError(
                f"qkv_bias={self.qkv_bias!r} with bias={self.bias!r} is not supported "
                "(with bias on the other linear layers, QKV has one too)"
            )
        return ModelConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            vocab_size=vocab_size,
            seq_length=self.encoder_seq_length,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            position_embedding_type=self.position_embedding_type,  # type: ignore[arg-type]
            rotary_base=float(self.rotary_base),
            rotary_percent=float(self.rotary_percentage),
            normalization=norm,  # type: ignore[arg-type]
            layernorm_epsilon=float(self.layernorm_epsilon),
            activation=activation,  # type: ignore[arg-type]
            bias=bool(self.bias),
            qkv_bias=bool(self.qkv_bias) and not self.bias,
            qk_layernorm=bool(self.qk_layernorm),
            rope_scaling=bool(self.scale_positional_embedding),
            rope_scaling_factor=float(self.rope_scaling_factor),
            rope_scaling_low_freq_factor=float(self.rope_scaling_low_freq_factor),
            rope_scaling_high_freq_factor=float(self.rope_scaling_high_freq_factor),
            rope_scaling_original_max_position_embeddings=int(
                self.rope_scaling_original_max_position_embeddings
            ),
            share_embeddings_and_output_weights=bool(self.share_embeddings_and_output_weights),
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
            hidden_dropout=float(self.hidden_dropout),
            attention_dropout=float(self.attention_dropout),
            init_method_std=float(self.init_method_std),
            dtype=self.dtype(),  # type: ignore[arg-type]
        )


def unwrap_model_section(cfg: Any, *, origin: str = "<nemo>") -> dict[str, Any]:
    """Return the model config, unwrapping a top-level ``model:`` key as NeMo does on restore.

    Raises:
        NemoFormatError: When the YAML document is not a mapping.
    """
    if not isinstance(cfg, Mapping):
        raise NemoFormatError(f"{origin}: model_config.yaml is not a mapping")
    if "model" in cfg and isinstance(cfg["model"], Mapping) and "num_layers" not in cfg:
        cfg = cfg["model"]
    return dict(cfg)


def model_config_from_nemo(
    cfg: Mapping[str, Any], *, vocab_size: int, origin: str = "<nemo>"
) -> ModelConfig:
    """Map a NeMo GPT model config to a `ModelConfig`.

    Both spellings of the normalisation are accepted (``layernorm``/``LayerNorm``,
    ``rmsnorm``/``RMSNorm``); ``encoder_seq_length`` falls back to ``max_position_embeddings``.
    NeMo configs do not store the vocabulary size, so the caller passes it (from the tokenizer or
    from the embedding's row count).

    Args:
        cfg: The model config (a top-level ``model:`` key is unwrapped).
        vocab_size: Vocabulary size for the model.
        origin: Name of the source, for error messages.

    Raises:
        NemoFormatError: For a missing required key.
        UnsupportedNemoConfigError: For an architecture this package cannot build.
    """
    return NemoGptConfig.from_dict(
        unwrap_model_section(cfg, origin=origin), origin=origin
    ).to_model_config(vocab_size)


def nemo_config_from_model(
    model: ModelConfig,
    *,
    tokenizer: Mapping[str, Any] | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    transformer_engine: bool = False,
    dist_ckpt_format: str | None = None,
) -> dict[str, Any]:
    """The ``model_config.yaml`` contents NeMo 1.x writes for a mcore GPT with this architecture.

    Args:
        model: Architecture.
        tokenizer: The ``tokenizer:`` section (artifact references already as ``nemo:...``).
        tensor_parallel_size: Layout of the saved weights (1 for ``model_weights.ckpt``).
        pipeline_parallel_size: Layout of the saved weights.
        transformer_engine: Whether the weights use Transformer Engine key names.
        dist_ckpt_format: ``"torch_dist"`` when the weights are a distributed checkpoint.

    Returns:
        A plain dict ready for ``yaml.safe_dump``.
    """
    cfg: dict[str, Any] = {
        "mcore_gpt": True,
        "micro_batch_size": 1,
        "global_batch_size": 1,
        "tensor_model_parallel_size": tensor_parallel_size,
        "pipeline_model_parallel_size": pipeline_parallel_size,
        "virtual_pipeline_model_parallel_size": None,
        "encoder_seq_length": model.seq_length,
        "max_position_embeddings": model.seq_length,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.num_query_groups,
        "kv_channels": model.kv_channels,
        "init_method_std": model.init_method_std,
        "use_scaled_init_method": True,
        "hidden_dropout": model.hidden_dropout,
        "attention_dropout": model.attention_dropout,
        "ffn_dropout": 0.0,
        "normalization": model.normalization.lower(),
        "layernorm_epsilon": model.layernorm_epsilon,
        "do_layer_norm_weight_decay": False,
        "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
        "pre_process": True,
        "post_process": True,
        "persist_layer_norm": True,
        "bias": model.bias,
        "qkv_bias": model.bias or model.qkv_bias,
        "qk_layernorm": model.qk_layernorm,
        "activation": model.activation,
        "headscale": False,
        "transformer_block_type": "pre_ln",
        "openai_gelu": False,
        "normalize_attention_scores": True,
        "position_embedding_type": model.position_embedding_type,
        "rotary_percentage": model.rotary_percent,
        "rotary_base": model.rotary_base,
        "scale_positional_embedding": model.rope_scaling,
        "apply_query_key_layer_scaling": False,
        "share_embeddings_and_output_weights": model.share_embeddings_and_output_weights,
        "precision": _WRITE_PRECISION[model.dtype],
        "megatron_amp_O2": model.dtype != "fp32",
        "transformer_engine": transformer_engine,
    }
    if model.rope_scaling:
        cfg.update(
            rope_scaling_factor=model.rope_scaling_factor,
            rope_scaling_low_freq_factor=model.rope_scaling_low_freq_factor,
            rope_scaling_high_freq_factor=model.rope_scaling_high_freq_factor,
            rope_scaling_original_max_position_embeddings=(
                model.rope_scaling_original_max_position_embeddings
            ),
        )
    if dist_ckpt_format is not None:
        cfg["dist_ckpt_format"] = dist_ckpt_format
    if tokenizer is not None:
        cfg["tokenizer"] = dict(tokenizer)
    cfg["target"] = NEMO_GPT_TARGET
    cfg["nemo_version"] = "1.23.0"
    return cfg
