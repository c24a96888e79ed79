"""Which Hugging Face tensors make each megatron-core parameter, and how they are fused.

Megatron's local-spec names (`align_core.spec_keys` converts Transformer Engine names) against
the Llama-family names of transformers::

    embedding.word_embeddings.weight               model.embed_tokens.weight
    decoder.layers.N.input_layernorm.weight        model.layers.N.input_layernorm.weight
    decoder.layers.N.self_attention.linear_qkv.*   model.layers.N.self_attn.{q,k,v}_proj.*
    decoder.layers.N.self_attention.linear_proj.*  model.layers.N.self_attn.o_proj.*
    decoder.layers.N.self_attention.q_layernorm.*  model.layers.N.self_attn.q_norm.*   (Qwen3)
    decoder.layers.N.self_attention.k_layernorm.*  model.layers.N.self_attn.k_norm.*   (Qwen3)
    decoder.layers.N.pre_mlp_layernorm.weight      model.layers.N.post_attention_layernorm.weight
    decoder.layers.N.mlp.linear_fc1.*              model.layers.N.mlp.{gate,up}_proj.*
    decoder.layers.N.mlp.linear_fc2.*              model.layers.N.mlp.down_proj.*
    decoder.final_layernorm.weight                 model.norm.weight
    output_layer.weight                            lm_head.weight  (absent when tied)

Megatron fuses q, k and v per query group: for each of the ``G`` key/value heads, the
``H/G`` query heads that share it, then its key head, then its value head (``head_dim`` rows
each). Tensor parallelism gives each rank ``G/tp`` whole groups, so a rank's slice of the fused
tensor is `fuse_qkv` of contiguous row ranges of q, k and v. ``linear_fc1`` stacks
``[gate; up]``; each tensor-parallel rank holds ``[gate_r; up_r]``. All functions are pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from align_core.config import ModelConfig

__all__ = [
    "WeightMapping",
    "fuse_qkv",
    "hf_names",
    "split_qkv",
    "weight_mappings",
]

Kind = Literal["plain", "qkv", "gated"]


@dataclass(frozen=True)
class WeightMapping:
    """One megatron parameter and the Hugging Face tensors it is made of.

    Attributes:
        megatron: Local-spec key, global layer number.
        hf: The Hugging Face tensor names: one for ``plain``, ``(q, k, v)`` for ``qkv``,
            ``(gate, up)`` for ``gated``.
        kind: How the Hugging Face tensors combine.
    """

    megatron: str
    hf: tuple[str, ...]
    kind: Kind = "plain"


def _layer(model: ModelConfig, i: int) -> list[WeightMapping]:
    mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
    suffixes = ("weight", "bias") if model.bias else ("weight",)
    qkv_suffixes = ("weight", "bias") if model.bias or model.qkv_bias else ("weight",)
    out = [
        WeightMapping(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",)),
        WeightMapping(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",)),
    ]
    for s in qkv_suffixes:
        names = tuple(f"{hf}self_attn.{p}_proj.{s}" for p in "qkv")
        out.append(WeightMapping(f"{mg}self_attention.linear_qkv.{s}", names, "qkv"))
    for s in suffixes:
        out.append(
            WeightMapping(f"{mg}self_attention.linear_proj.{s}", (f"{hf}self_attn.o_proj.{s}",))
        )
        gate_up = (f"{hf}mlp.gate_proj.{s}", f"{hf}mlp.up_proj.{s}")
        out.append(WeightMapping(f"{mg}mlp.linear_fc1.{s}", gate_up, "gated"))
        out.append(WeightMapping(f"{mg}mlp.linear_fc2.{s}", (f"{hf}mlp.down_proj.{s}",)))
    if model.qk_layernorm:
        for p in "qk":
            out.append(
                WeightMapping(
                    f"{mg}self_attention.{p}_layernorm.weight", (f"{hf}self_attn.{p}_norm.weight",)
                )
            )
    return out


def weight_mappings(model: ModelConfig) -> list[WeightMapping]:
    """Every parameter of a full (unsplit) model of architecture ``model``, in model order.

    Raises:
        ValueError: For a model that is not Llama-shaped (non-gated MLP, LayerNorm, learned
            positions), which has no Hugging Face Llama names.
    """
    if not model.gated or model.normalization != "RMSNorm":
        raise ValueError(
            f"only gated RMSNorm models map to Hugging Face Llama names (activation "
            f"{model.activation!r}, normalization {model.normalization!r})"
        )
    if model.position_embedding_type != "rope":
        raise ValueError(
            f"position_embedding_type {model.position_embedding_type!r} has no Llama equivalent"
        )
    out = [WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    for i in range(model.num_layers):
        out.extend(_layer(model, i))
    out.append(WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not model.share_embeddings_and_output_weights:
        out.append(WeightMapping("output_layer.weight", ("lm_head.weight",)))
    return out


def hf_names(model: ModelConfig) -> list[str]:
    """The Hugging Face tensor names of a model of architecture ``model``, in model order."""
    return [name for m in weight_mappings(model) for name in m.hf]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: int) -> torch.Tensor:
    """Megatron's fused ``linear_qkv`` rows from separate q, k, v rows (weights or biases).

    Args:
        q: ``[groups * heads_per_group * head_dim, ...]``.
        k: ``[groups * head_dim, ...]``.
        v: Same shape as ``k``.
        groups: Key/value heads in these rows.

    Returns:
        ``[groups * (heads_per_group + 2) * head_dim, ...]``: per group its query heads, its
        key head, its value head.
    """
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(
    fused: torch.Tensor, *, groups: int, heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_qkv`: q, k, v rows of a fused ``linear_qkv`` weight or bias.

    Args:
        fused: ``[groups * (heads / groups + 2) * head_dim, ...]``.
        groups: Key/value heads.
        heads: Query heads.
        head_dim: Width of one head.
    """
    rest = fused.shape[1:]
    per_group = fused.reshape(groups, -1, *rest)
    q_rows = heads // groups * head_dim
    q, k, v = per_group.split([q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))  # type: ignore[return-value]
