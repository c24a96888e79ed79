"""Typed configuration of the GPT model and of how it runs (parallel layout, recomputation).

`ModelConfig` covers what NeMo GPT checkpoints use; `to_transformer_config` turns it into a
megatron-core `TransformerConfig`. Every default lives in a dataclass field here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict

import torch

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = [
    "ACTIVATIONS",
    "ModelConfig",
    "ParallelConfig",
    "padded_vocab_size",
    "to_transformer_config",
    "torch_dtype",
]

Activation = Literal["gelu", "fast-gelu", "geglu", "swiglu", "fast-swiglu", "reglu", "squared-relu"]
ACTIVATIONS: tuple[str, ...] = (
    "gelu",
    "fast-gelu",
    "geglu",
    "swiglu",
    "fast-swiglu",
    "reglu",
    "squared-relu",
)
_POSITIVE_SIZES = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "vocab_size",
    "seq_length",
    "num_query_groups",
    "kv_channels",
    "make_vocab_size_divisible_by",
)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only GPT (the subset of NeMo's GPT config that shapes weights).

    Attributes:
        num_layers: Transformer layers.
        hidden_size: Model width.
        ffn_hidden_size: Width of the MLP (per branch for gated activations).
        num_attention_heads: Query heads.
        vocab_size: Tokenizer vocabulary size (before padding).
        seq_length: Maximum sequence length (NeMo's ``encoder_seq_length``).
        num_query_groups: Key/value heads for grouped-query attention; None means one per head.
        kv_channels: Per-head width; None means ``hidden_size // num_attention_heads``.
        position_embedding_type: ``"rope"`` or ``"learned_absolute"``.
        rotary_base: RoPE base frequency.
        rotary_percent: Fraction of each head's channels that RoPE rotates.
        rope_scaling: Llama 3.1 RoPE frequency scaling (``rope_type: llama3``): wavelengths
            longer than ``original_max_position_embeddings / low_freq_factor`` are stretched
            by ``factor``, shorter than ``... / high_freq_factor`` kept, those between
            interpolated. The four values below apply only when it is True; their defaults are
            megatron-core's (and NeMo 1.x's) fixed ones.
        rope_scaling_factor: The stretch ``factor``.
        rope_scaling_low_freq_factor: ``low_freq_factor``.
        rope_scaling_high_freq_factor: ``high_freq_factor``.
        rope_scaling_original_max_position_embeddings: Context length of pre-training before
            the extension (``original_max_position_embeddings``).
        normalization: ``"LayerNorm"`` or ``"RMSNorm"``.
        layernorm_epsilon: Epsilon of the norms.
        activation: MLP activation, NeMo's names (gated ones double ``linear_fc1``).
        bias: Bias on the linear layers (all of them: fused q/k/v, attention output, MLP).
        qkv_bias: Bias on the fused q/k/v projection even where ``bias`` is False (Qwen2);
            with ``bias`` True it changes nothing.
        qk_layernorm: Normalise each head's queries and keys before RoPE (``normalization``
            type, ``kv_channels`` wide; Qwen3).
        share_embeddings_and_output_weights: Tie the output layer to the input embedding.
        make_vocab_size_divisible_by: Pad the vocabulary to a multiple of this times TP.
        hidden_dropout: Dropout after attention and MLP.
        attention_dropout: Dropout of attention probabilities.
        init_method_std: Standard deviation of the weight initialisation.
        dtype: Parameter dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    vocab_size: int = 256
    seq_length: int = 256
    num_query_groups: int | None = None
    kv_channels: int | None = None
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    activation: Activation = "swiglu"
    bias: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    share_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    def __post_init__(self) -> None:
        for name in _POSITIVE_SIZES:
            value = getattr(self, name)
            if value is None and name in ("num_query_groups", "kv_channels"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: {self.activation!r} is not one of {ACTIVATIONS}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {tuple(_DTYPES)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {groups}"
            )
        if self.rope_scaling and self.position_embedding_type != "rope":
            raise ValueError(
                "rope_scaling: needs position_embedding_type 'rope', got "
                f"{self.position_embedding_type!r}"
            )
        if self.rope_scaling and not (
            self.rope_scaling_high_freq_factor > self.rope_scaling_low_freq_factor > 0
        ):
            raise ValueError(
                "rope_scaling_high_freq_factor must exceed rope_scaling_low_freq_factor > 0, got "
                f"{self.rope_scaling_high_freq_factor} and {self.rope_scaling_low_freq_factor}"
            )

    @property
    def gated(self) -> bool:
        """Whether the MLP is gated (``linear_fc1`` holds two stacked projections)."""
        return self.activation in ("geglu", "swiglu", "fast-swiglu", "reglu")

    def replace(self, **changes: object) -> ModelConfig:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over processes, and which activations it keeps for backward.

    Activation recomputation (NeMo's ``activations_checkpoint_*`` keys, megatron's
    ``recompute_*``) trades compute for memory and leaves losses and gradients unchanged:
    ``"selective"`` recomputes core attention; ``"full"`` keeps only each checkpointed layer's
    input and runs its forward again during backward (what other trainers call gradient
    checkpointing).

    Attributes:
        tensor_model_parallel_size: Tensor-parallel ranks (vocab and heads are split).
        pipeline_model_parallel_size: Pipeline stages (layers are split).
        sequence_parallel: Megatron sequence parallelism (GPU with Transformer Engine only).
        context_parallel_size: Context-parallel ranks (GPU only).
        activations_checkpoint_granularity: None (keep every activation), ``"selective"`` or
            ``"full"``.
        activations_checkpoint_method: With ``"full"``: ``"uniform"`` checkpoints groups of
            ``activations_checkpoint_num_layers`` layers; ``"block"`` checkpoints only the
            first ``activations_checkpoint_num_layers`` layers of each pipeline stage.
        activations_checkpoint_num_layers: Layers per group (``uniform``) or checkpointed
            layers per stage (``block``).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    activations_checkpoint_granularity: Literal["selective", "full"] | None = None
    activations_checkpoint_method: Literal["uniform", "block"] = "uniform"
    activations_checkpoint_num_layers: int = 1

    def __post_init__(self) -> None:
        if self.activations_checkpoint_granularity not in (None, "selective", "full"):
            raise ValueError(
                "activations_checkpoint_granularity: "
                f"{self.activations_checkpoint_granularity!r} is not one of None, 'selective', "
                "'full'"
            )
        if self.activations_checkpoint_method not in ("uniform", "block"):
            raise ValueError(
                f"activations_checkpoint_method: {self.activations_checkpoint_method!r} is not "
                "one of 'uniform', 'block'"
            )
        if self.activations_checkpoint_num_layers < 1:
            raise ValueError(
                "activations_checkpoint_num_layers: must be at least 1, got "
                f"{self.activations_checkpoint_num_layers}"
            )


def torch_dtype(name: str) -> torch.dtype:
    """Map ``"fp32" | "bf16" | "fp16"`` to the torch dtype."""
    return _DTYPES[name]


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Vocabulary size padded to a multiple of ``divisible_by * tensor_parallel_size``.

    This is NeMo/Megatron's rule, so padded embeddings match checkpoints trained with it.
    """
    multiple = max(1, divisible_by) * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def _activation(name: str):
    import torch.nn.functional as F

    if name in ("gelu", "fast-gelu", "geglu"):
        return F.gelu
    if name in ("swiglu", "fast-swiglu"):
        return F.silu
    if name == "reglu":
        return F.relu
    from megatron.core.activations import squared_relu

    return squared_relu


def to_transformer_config(
    model: ModelConfig, parallel: ParallelConfig = ParallelConfig()
) -> TransformerConfig:
    """Build the megatron-core ``TransformerConfig`` for ``model`` under ``parallel``.

    Fusions that need CUDA kernels stay off; megatron picks its own implementations.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch_dtype(model.dtype)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        gated_linear_unit=model.gated,
        activation_func=_activation(model.activation),
        add_bias_linear=model.bias,
        add_qkv_bias=model.bias or model.qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **_recompute(model, parallel),
    )


class _RecomputeKwargs(TypedDict, total=False):
    """The ``recompute_*`` keyword arguments of megatron's ``TransformerConfig``."""

    recompute_granularity: Literal["selective", "full"] | None
    recompute_method: Literal["uniform", "block"]
    recompute_num_layers: int


def _recompute(model: ModelConfig, parallel: ParallelConfig) -> _RecomputeKwargs:
    """Megatron's ``recompute_*`` arguments for ``parallel``'s activation checkpointing.

    Raises:
        ValueError: ``full`` recomputation whose layer count does not fit a pipeline stage.
    """
    granularity = parallel.activations_checkpoint_granularity
    if granularity != "full":
        return {"recompute_granularity": granularity}
    per_stage = model.num_layers // parallel.pipeline_model_parallel_size
    layers = parallel.activations_checkpoint_num_layers
    method = parallel.activations_checkpoint_method
    if (method == "uniform" and per_stage % layers) or (method == "block" and layers > per_stage):
        need = "divide" if method == "uniform" else "be at most"
        raise ValueError(
            f"activations_checkpoint_num_layers: {layers} must {need} the {per_stage} layers of "
            f"each pipeline stage (activations_checkpoint_method={method!r})"
        )
    return {
        "recompute_granularity": "full",
        "recompute_method": parallel.activations_checkpoint_method,
        "recompute_num_layers": parallel.activations_checkpoint_num_layers,
    }
