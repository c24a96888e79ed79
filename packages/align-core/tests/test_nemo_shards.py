"""Tensor/pipeline split and merge rules, checked against hand-built layouts."""

from __future__ import annotations

import pytest
import torch

from align_core import ModelConfig
from align_core.nemo import (
    merge_pipeline_stages,
    merge_tensor_parallel,
    partition_of,
    random_state_dict,
    split_tensor_parallel,
    strip_prefix,
)
from align_core.nemo.errors import NemoFormatError


def _rows(n: int, width: int = 3) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, width).clone()


def test_gated_fc1_split_interleaves_gate_and_up():
    # rows 0-3 are the gate projection, 4-7 the up projection
    full = {"decoder.layers.0.mlp.linear_fc1.weight": _rows(8)}
    r0 = split_tensor_parallel(full, 0, 2, gated=True)["decoder.layers.0.mlp.linear_fc1.weight"]
    r1 = split_tensor_parallel(full, 1, 2, gated=True)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert r0[:, 0].tolist() == [0, 1, 4, 5]
    assert r1[:, 0].tolist() == [2, 3, 6, 7]
    shards = [{"decoder.layers.0.mlp.linear_fc1.weight": t} for t in (r0, r1)]
    merged = merge_tensor_parallel(shards, gated=True)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert merged[:, 0].tolist() == list(range(8))
    # not gated: plain contiguous halves
    plain = split_tensor_parallel(full, 1, 2, gated=False)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert plain[:, 0].tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize(
    ("key", "dim"),
    [
        ("embedding.word_embeddings.weight", 0),
        ("output_layer.weight", 0),
        ("decoder.layers.3.self_attention.linear_qkv.weight", 0),
        ("decoder.layers.3.self_attention.linear_qkv.bias", 0),
        ("decoder.layers.3.mlp.linear_fc1.bias", 0),
        ("decoder.layers.3.self_attention.linear_proj.weight", 1),
        ("decoder.layers.3.mlp.linear_fc2.weight", 1),
        ("decoder.layers.3.self_attention.linear_proj.bias", None),
        ("decoder.layers.3.mlp.linear_fc2.bias", None),
        ("decoder.layers.3.input_layernorm.weight", None),
        ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", None),
        ("decoder.layers.3.mlp.linear_fc1.layer_norm_bias", None),
        ("decoder.final_layernorm.weight", None),
        ("embedding.position_embeddings.weight", None),
        ("decoder.layers.0.self_attention.linear_qkv_lora.lora_a", None),
        ("decoder.layers.0.self_attention.linear_qkv_lora.lora_b", 0),
        ("decoder.layers.0.mlp.linear_fc2_lora.lora_a", 1),
        ("decoder.layers.0.mlp.linear_fc2_lora.lora_b", None),
    ],
)
def test_partition_rules(key, dim):
    assert partition_of(key, gated=False).dim == dim


def test_split_then_merge_is_identity_for_a_full_model():
    cfg = ModelConfig(vocab_size=300, num_query_groups=2, bias=True, normalization="LayerNorm")
    full = {k: v for k, v in random_state_dict(cfg, seed=1).items() if v is not None}
    shards = [split_tensor_parallel(full, r, 2, gated=cfg.gated) for r in range(2)]
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    assert shards[0][qkv].shape[0] * 2 == full[qkv].shape[0]
    proj = "decoder.layers.1.self_attention.linear_proj.weight"
    assert torch.equal(shards[1][proj], full[proj][:, 32:])
    assert torch.equal(
        shards[1]["decoder.layers.1.self_attention.linear_proj.bias"],
        full["decoder.layers.1.self_attention.linear_proj.bias"],
    )
    merged = merge_tensor_parallel(shards, gated=cfg.gated)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_pipeline_stages_renumber_layers_and_drop_tied_copy():
    emb = torch.randn(4, 2)
    stage0 = {
        "embedding.word_embeddings.weight": emb,
        "decoder.layers.0.mlp.linear_fc2.weight": torch.full((1,), 0.0),
        "decoder.layers.1.mlp.linear_fc2.weight": torch.full((1,), 1.0),
    }
    stage1 = {
        "decoder.layers.0.mlp.linear_fc2.weight": torch.full((1,), 2.0),
        "decoder.final_layernorm.weight": torch.ones(2),
        "output_layer.weight": emb.clone(),
    }
    merged = merge_pipeline_stages([stage0, stage1], share_embeddings=True)
    assert [merged[f"decoder.layers.{i}.mlp.linear_fc2.weight"].item() for i in range(3)] == [
        0,
        1,
        2,
    ]
    assert "output_layer.weight" not in merged
    untied = merge_pipeline_stages([stage0, stage1], share_embeddings=False)
    assert "output_layer.weight" in untied


def test_merge_rejects_mismatched_shards():
    with pytest.raises(ValueError, match="rank 1 holds different keys"):
        merge_tensor_parallel(
            [{"a.weight": torch.ones(1)}, {"b.weight": torch.ones(1)}], gated=False
        )


def test_strip_prefix():
    sd = {"model.decoder.final_layernorm.weight": 1, "model.embedding.word_embeddings.weight": 2}
    assert strip_prefix(sd) == {
        "decoder.final_layernorm.weight": 1,
        "embedding.word_embeddings.weight": 2,
    }
    assert strip_prefix({"model.module.output_layer.weight": 3}) == {"output_layer.weight": 3}
    assert strip_prefix({"output_layer.weight": 3}) == {"output_layer.weight": 3}
    with pytest.raises(NemoFormatError, match="pre-mcore"):
        strip_prefix({"model.language_model.embedding.word_embeddings.weight": 1})
    with pytest.raises(NemoFormatError, match="different prefixes"):
        strip_prefix({"model.output_layer.weight": 1, "decoder.final_layernorm.weight": 2})
