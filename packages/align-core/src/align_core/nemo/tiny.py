"""Small random-initialised `.nemo` files for tests, examples and the demo.

`random_state_dict` builds the full (TP=1) megatron local-spec state dict of a `ModelConfig`
with plain torch, so no process group is needed; `write_tiny_nemo` packs it with a tokenizer.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from align_core.config import ModelConfig, padded_vocab_size, torch_dtype
from align_core.nemo.tokenizer import TokenizerSpec, write_byte_bpe_files
from align_core.nemo.writer import write_nemo

__all__ = ["random_state_dict", "write_tiny_nemo"]


def random_state_dict(model: ModelConfig, *, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """A full megatron (local spec, TP=1) GPT state dict with random weights.

    Weights are normal(0, ``init_method_std``) (output projections scaled by
    ``1/sqrt(2·num_layers)`` as megatron does), norm weights one, biases zero. Keys, order and
    shapes are those of ``build_gpt_model(model).state_dict()``, including the ``_extra_state``
    placeholders (None).

    Args:
        model: Architecture; the vocabulary is padded as megatron pads it at TP=1.
        seed: Seed of the private generator (the global RNG is untouched).
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(model.dtype)
    std = model.init_method_std
    out_std = std / math.sqrt(2.0 * model.num_layers)
    h = model.hidden_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    kv = model.kv_channels or h // heads
    vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, 1)
    fc1_rows = model.ffn_hidden_size * (2 if model.gated else 1)
    layernorm = model.normalization == "LayerNorm"

    def normal(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        d = {f"{prefix}.weight": torch.ones(h, dtype=dtype)}
        if layernorm:
            d[f"{prefix}.bias"] = torch.zeros(h, dtype=dtype)
        return d

    def linear(prefix: str, rows: int, cols: int, scale: float) -> dict[str, torch.Tensor | None]:
        d: dict[str, torch.Tensor | None] = {f"{prefix}.weight": normal(rows, cols, scale=scale)}
        if model.bias:
            d[f"{prefix}.bias"] = torch.zeros(rows, dtype=dtype)
        d[f"{prefix}._extra_state"] = None
        return d

    state: dict[str, torch.Tensor | None] = {"embedding.word_embeddings.weight": normal(vocab, h)}
    if model.position_embedding_type == "learned_absolute":
        state["embedding.position_embeddings.weight"] = normal(model.seq_length, h)
    for i in range(model.num_layers):
        p = f"decoder.layers.{i}"
        state.update(norm(f"{p}.input_layernorm"))
        state.update(linear(f"{p}.self_attention.linear_proj", h, heads * kv, out_std))
        state.update(linear(f"{p}.self_attention.linear_qkv", (heads + 2 * groups) * kv, h, std))
        state.update(norm(f"{p}.pre_mlp_layernorm"))
        state.update(linear(f"{p}.mlp.linear_fc1", fc1_rows, h, std))
        state.update(linear(f"{p}.mlp.linear_fc2", h, model.ffn_hidden_size, out_std))
    state.update(norm("decoder.final_layernorm"))
    if not model.share_embeddings_and_output_weights:
        state["output_layer.weight"] = normal(vocab, h)
    state["output_layer._extra_state"] = None
    return state


def write_tiny_nemo(
    path: str | os.PathLike[str],
    model: ModelConfig | None = None,
    *,
    tokenizer: TokenizerSpec | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-initialised `.nemo` with a tokenizer.

    Args:
        path: Destination `.nemo`.
        model: Architecture; default ``ModelConfig(vocab_size=320)``.
        tokenizer: Tokenizer to embed; default: a byte-level BPE (`write_byte_bpe_files`) with
            exactly ``model.vocab_size`` tokens (which must then be at least 257).
        seed: Seed of the weights.

    Returns:
        ``path`` as a `Path`.
    """
    model = ModelConfig(vocab_size=320) if model is None else model
    state = random_state_dict(model, seed=seed)
    if tokenizer is not None:
        return write_nemo(path, state, model, tokenizer=tokenizer)
    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as tmp:
        spec = write_byte_bpe_files(tmp, model.vocab_size)
        return write_nemo(path, state, model, tokenizer=spec)
