"""NeMo config keys ↔ ModelConfig."""

from __future__ import annotations

import pytest

from align_core import ModelConfig
from align_core.nemo import (
    NemoFormatError,
    UnsupportedNemoConfigError,
    model_config_from_nemo,
    nemo_config_from_model,
)

LLAMA_STYLE = {
    "mcore_gpt": True,
    "num_layers": 4,
    "hidden_size": 128,
    "ffn_hidden_size": 352,
    "num_attention_heads": 8,
    "num_query_groups": 2,
    "encoder_seq_length": 512,
    "max_position_embeddings": 512,
    "position_embedding_type": "rope",
    "rotary_base": 500000,
    "rotary_percentage": 1.0,
    "normalization": "rmsnorm",
    "layernorm_epsilon": 1e-6,
    "activation": "fast-swiglu",
    "bias": False,
    "share_embeddings_and_output_weights": False,
    "make_vocab_size_divisible_by": 64,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "init_method_std": 0.01,
    "precision": "bf16-mixed",
    "kv_channels": None,
    "optim": {"name": "distributed_fused_adam", "lr": 1e-5},  # training keys are ignored
    "micro_batch_size": 4,
}


def test_llama_style_config_maps_every_field():
    cfg = model_config_from_nemo(LLAMA_STYLE, vocab_size=1000)
    assert cfg == ModelConfig(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=352,
        num_attention_heads=8,
        vocab_size=1000,
        seq_length=512,
        num_query_groups=2,
        kv_channels=None,
        position_embedding_type="rope",
        rotary_base=500000.0,
        rotary_percent=1.0,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        activation="fast-swiglu",
        bias=False,
        share_embeddings_and_output_weights=False,
        make_vocab_size_divisible_by=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.01,
        dtype="bf16",
    )


def test_nemo_defaults_apply_to_missing_keys_and_model_section_unwraps():
    minimal = {
        "num_layers": 2,
        "hidden_size": 64,
        "ffn_hidden_size": 256,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    cfg = model_config_from_nemo({"model": minimal}, vocab_size=300)
    # NeMo's GPT defaults, not ModelConfig's
    assert cfg.normalization == "LayerNorm"
    assert cfg.activation == "gelu"
    assert cfg.bias is True
    assert cfg.position_embedding_type == "learned_absolute"
    assert cfg.share_embeddings_and_output_weights is True
    assert cfg.seq_length == 128
    assert (cfg.hidden_dropout, cfg.attention_dropout) == (0.1, 0.1)
    assert cfg.dtype == "fp32"


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("layernorm", "LayerNorm"),
        ("LayerNorm", "LayerNorm"),
        ("rmsnorm", "RMSNorm"),
        ("RMSNorm", "RMSNorm"),
    ],
)
def test_both_normalization_spellings(spelling, expected):
    cfg = model_config_from_nemo({**LLAMA_STYLE, "normalization": spelling}, vocab_size=10)
    assert cfg.normalization == expected


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        (32, "fp32"),
        ("32-true", "fp32"),
        (16, "fp16"),
        ("16-mixed", "fp16"),
        ("bf16", "bf16"),
        ("bf16-mixed", "bf16"),
    ],
)
def test_precision(precision, dtype):
    assert (
        model_config_from_nemo({**LLAMA_STYLE, "precision": precision}, vocab_size=8).dtype == dtype
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_moe_experts", 8),
        ("transformer_block_type", "post_ln"),
        ("window_size", [128, 0]),
        ("normalization", "layernorm1p"),
        ("position_embedding_type", "alibi"),
        ("seq_len_interpolation_factor", 4),
        ("mcore_gpt", False),
        ("activation", "tanh"),
        ("headscale", True),
        ("rotary_interleaved", True),
    ],
)
def test_unsupported_values_raise(key, value):
    with pytest.raises(UnsupportedNemoConfigError, match=key):
        model_config_from_nemo({**LLAMA_STYLE, key: value}, vocab_size=8)


def test_inert_values_of_unsupported_keys_are_accepted():
    cfg = {
        **LLAMA_STYLE,
        "num_moe_experts": None,
        "transformer_block_type": "pre_ln",
        "qk_layernorm": False,
        "seq_len_interpolation_factor": None,
    }
    assert model_config_from_nemo(cfg, vocab_size=8).num_layers == 4


def test_qwen_and_llama31_keys_map_to_the_model_config():
    cfg = {
        **LLAMA_STYLE,
        "bias": False,
        "qkv_bias": True,
        "qk_layernorm": True,
        "scale_positional_embedding": True,
    }
    model = model_config_from_nemo(cfg, vocab_size=8)
    assert (model.bias, model.qkv_bias, model.qk_layernorm) == (False, True, True)
    # NeMo 1.x's Llama 3.1 scaling: megatron-core's fixed values (factor 8, 1, 4, 8192).
    assert model.rope_scaling
    assert (
        model.rope_scaling_factor,
        model.rope_scaling_low_freq_factor,
        model.rope_scaling_high_freq_factor,
        model.rope_scaling_original_max_position_embeddings,
    ) == (8.0, 1.0, 4.0, 8192)


def test_qkv_bias_and_rope_scaling_values_survive_a_round_trip():
    model = model_config_from_nemo({**LLAMA_STYLE, "bias": False}, vocab_size=8).replace(
        qkv_bias=True,
        qk_layernorm=True,
        rope_scaling=True,
        rope_scaling_factor=32.0,
        rope_scaling_low_freq_factor=2.0,
        rope_scaling_high_freq_factor=8.0,
        rope_scaling_original_max_position_embeddings=64,
    )
    assert model_config_from_nemo(nemo_config_from_model(model), vocab_size=8) == model


def test_missing_required_key():
    cfg = {k: v for k, v in LLAMA_STYLE.items() if k != "hidden_size"}
    with pytest.raises(NemoFormatError, match="'hidden_size'"):
        model_config_from_nemo(cfg, vocab_size=8)


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(),
        ModelConfig(
            normalization="LayerNorm",
            activation="gelu",
            bias=True,
            position_embedding_type="learned_absolute",
            share_embeddings_and_output_weights=True,
            num_query_groups=2,
            kv_channels=32,
            rotary_percent=0.5,
            dtype="bf16",
        ),
        ModelConfig(activation="squared-relu", dtype="fp16", make_vocab_size_divisible_by=8),
    ],
)
def test_round_trip_through_nemo_keys(model):
    written = nemo_config_from_model(model, tokenizer={"library": "byte-level"})
    assert written["normalization"] in ("layernorm", "rmsnorm")  # NeMo's spelling on disk
    assert written["encoder_seq_length"] == written["max_position_embeddings"] == model.seq_length
    assert model_config_from_nemo(written, vocab_size=model.vocab_size) == model
