"""TE ↔ local spec key names."""

from __future__ import annotations

from align_core.spec_keys import convert_spec, detect_spec, local_to_te, te_to_local

LOCAL = {
    "model.embedding.word_embeddings.weight": 0,
    "model.decoder.layers.0.input_layernorm.weight": 1,
    "model.decoder.layers.0.input_layernorm.bias": 2,
    "model.decoder.layers.0.self_attention.linear_qkv.weight": 3,
    "model.decoder.layers.0.self_attention.linear_qkv._extra_state": None,
    "model.decoder.layers.0.pre_mlp_layernorm.weight": 4,
    "model.decoder.layers.0.mlp.linear_fc1.weight": 5,
    "model.decoder.layers.12.input_layernorm.weight": 6,
    "model.decoder.final_layernorm.weight": 7,
}
TE = {
    "model.embedding.word_embeddings.weight": 0,
    "model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": 1,
    "model.decoder.layers.0.self_attention.linear_qkv.layer_norm_bias": 2,
    "model.decoder.layers.0.self_attention.linear_qkv.weight": 3,
    "model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 4,
    "model.decoder.layers.0.mlp.linear_fc1.weight": 5,
    "model.decoder.layers.12.self_attention.linear_qkv.layer_norm_weight": 6,
    "model.decoder.final_layernorm.weight": 7,
}


def test_local_to_te_and_back():
    assert local_to_te(LOCAL) == TE
    back = dict(LOCAL)
    del back["model.decoder.layers.0.self_attention.linear_qkv._extra_state"]
    assert te_to_local(TE) == back


def test_te_extra_state_is_dropped():
    te = {
        **TE,
        "model.decoder.layers.0.self_attention.core_attention._extra_state": b"fp8",
        "model.decoder.layers.0.mlp.linear_fc1._extra_state": b"fp8",
    }
    assert not any(k.endswith("_extra_state") for k in te_to_local(te))


def test_detect_and_convert():
    assert detect_spec(LOCAL) == "local"
    assert detect_spec(TE) == "te"
    assert detect_spec({"model.embedding.word_embeddings.weight": 0}) is None
    assert convert_spec(TE, "te") == TE
    assert convert_spec(LOCAL, "local") == LOCAL
    assert convert_spec(LOCAL, "te") == TE
