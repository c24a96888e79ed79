"""Hugging Face directories in and out without transformers: config mapping, fused layouts,
per-rank slices, sharded safetensors and every refusal (single process, CPU)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from align_core import ModelConfig, build_gpt_model
from align_core.hf import (
    HFFormatError,
    checkpoint_dtype,
    fuse_qkv,
    hf_config_from_model,
    hf_state_dict,
    load_hf_weights,
    model_config_from_hf,
    open_hf,
    split_qkv,
    weight_mappings,
    write_hf,
)
from align_core.hf.checkpoint import read_rank_slice
from align_core.model import llama3_scaled_inv_freq
from align_core.nemo.shards import merge_tensor, partition_of

# A Llama-3-shaped config, transformers 5 spelling (rope_parameters, dtype).
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "dtype": "float32",
}


def test_llama_config_maps_to_the_model_config():
    model = model_config_from_hf(LLAMA)
    assert (model.num_layers, model.hidden_size, model.ffn_hidden_size) == (2, 32, 48)
    assert (model.num_attention_heads, model.num_query_groups, model.kv_channels) == (4, 2, 8)
    assert (model.vocab_size, model.seq_length, model.rotary_base) == (96, 64, 10000.0)
    assert (model.normalization, model.activation, model.layernorm_epsilon) == (
        "RMSNorm",
        "swiglu",
        1e-5,
    )
    assert not (model.bias or model.qkv_bias or model.qk_layernorm or model.rope_scaling)
    assert model.dtype == "fp32" and model.make_vocab_size_divisible_by == 1


def test_transformers_4_and_5_spellings_give_the_same_model():
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    tf5 = {**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
    tf4 = {k: v for k, v in LLAMA.items() if k not in ("rope_parameters", "dtype")}
    tf4.update(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **scaling})
    tf4["torch_dtype"] = "float32"
    assert model_config_from_hf(tf4) == model_config_from_hf(tf5)
    model = model_config_from_hf(tf5)
    assert model.rope_scaling and model.rotary_base == 5e5
    assert model.rope_scaling_original_max_position_embeddings == 32


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_scaling type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"vocab_size": None}, "vocab_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding_window"),
        ({"dtype": "float64"}, "dtype"),
    ],
)
def test_unsupported_or_invalid_values_name_the_key(change, named):
    config = {**LLAMA, **change}
    with pytest.raises(HFFormatError, match=named) as info:
        model_config_from_hf(config, origin="/m/config.json")
        checkpoint_dtype(config, origin="/m/config.json")
    assert "/m/config.json" in str(info.value)


def test_full_attention_windows_and_disabled_windows_are_accepted():
    mistral = {**LLAMA, "model_type": "mistral", "sliding_window": 64}
    qwen2 = {**LLAMA, "model_type": "qwen2", "sliding_window": 4, "use_sliding_window": False}
    assert model_config_from_hf(mistral).num_layers == 2
    assert model_config_from_hf(qwen2).qkv_bias


def test_fuse_qkv_is_megatrons_per_group_layout():
    heads, groups, head_dim, width = 4, 2, 3, 5
    q = torch.randn(heads * head_dim, width)
    k = torch.randn(groups * head_dim, width)
    v = torch.randn(groups * head_dim, width)
    rows = []
    for g in range(groups):  # query heads g*2, g*2+1 share key/value head g
        for h in range(g * heads // groups, (g + 1) * heads // groups):
            rows.append(q[h * head_dim : (h + 1) * head_dim])
        rows.append(k[g * head_dim : (g + 1) * head_dim])
        rows.append(v[g * head_dim : (g + 1) * head_dim])
    expected = torch.cat(rows)
    fused = fuse_qkv(q, k, v, groups=groups)
    assert torch.equal(fused, expected)
    back = split_qkv(fused, groups=groups, heads=heads, head_dim=head_dim)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


def test_llama3_rope_scaling_follows_the_piecewise_rule():
    base, dim = 5e5, 16
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high, original = 8.0, 1.0, 4.0, 64
    got = llama3_scaled_inv_freq(
        inv_freq,
        factor=factor,
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=original,
    )
    for f, g in zip(inv_freq.tolist(), got.tolist(), strict=True):
        wavelength = 2 * math.pi / f
        if wavelength < original / high:
            want = f
        elif wavelength > original / low:
            want = f / factor
        else:
            s = (original / wavelength - low) / (high - low)
            want = (1 - s) * f / factor + s * f
        assert g == pytest.approx(want, rel=1e-6)
    assert got[0] == inv_freq[0] and got[-1] == pytest.approx(inv_freq[-1].item() / factor)


def _tiny(dist_ctx, config: dict) -> tuple[ModelConfig, torch.nn.Module]:
    model_config = model_config_from_hf(config)
    return model_config, build_gpt_model(model_config, device="cpu")


def _perturbed_copy(dist_ctx, model_config: ModelConfig) -> torch.nn.Module:
    other = build_gpt_model(model_config, device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(0.5)
    return other


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"tie_word_embeddings": True},
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
        {"model_type": "qwen3", "head_dim": 16, "architectures": ["Qwen3ForCausalLM"]},
        {"attention_bias": True, "mlp_bias": True},
    ],
    ids=["llama", "tied", "qwen2", "qwen3", "bias"],
)
def test_write_then_load_gives_the_same_parameters(dist_ctx, one_thread, tmp_path, change):
    config = {**LLAMA, **change}
    model_config, model = _tiny(dist_ctx, config)
    written = write_hf(tmp_path / "hf", model.state_dict(), model_config)
    stored = json.loads((written / "config.json").read_text())
    assert stored["model_type"] == config["model_type"]
    other = _perturbed_copy(dist_ctx, model_config)
    with open_hf(written) as ckpt:
        assert ckpt.model_config == model_config
        load_hf_weights(other, ckpt)
    want, got = model.state_dict(), other.state_dict()
    assert [k for k in want if not k.endswith("_extra_state")] == [
        k for k in got if not k.endswith("_extra_state")
    ]
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key


def test_sharded_output_has_an_index_and_loads_the_same(dist_ctx, one_thread, tmp_path):
    model_config, model = _tiny(dist_ctx, LLAMA)
    single = write_hf(tmp_path / "single", model.state_dict(), model_config)
    sharded = write_hf(
        tmp_path / "sharded", model.state_dict(), model_config, max_shard_bytes=20_000
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    with open_hf(single) as a, open_hf(sharded) as b:
        assert a.tensors.names() == b.tensors.names() == set(index["weight_map"])
        for name in a.tensors.names():
            assert torch.equal(a.tensors.read(name), b.tensors.read(name)), name
    tensors = hf_state_dict(model.state_dict(), model_config, dtype=torch.float32)
    total = sum(t.numel() * 4 for t in tensors.values())
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_as_their_rounded_values(dist_ctx, tmp_path, dtype):
    model_config, model = _tiny(dist_ctx, LLAMA)
    written = write_hf(tmp_path / "hf", model.state_dict(), model_config, dtype=dtype)
    assert json.loads((written / "config.json").read_text())["dtype"] == str(dtype)[6:]
    other = _perturbed_copy(dist_ctx, model_config)
    with open_hf(written) as ckpt:
        assert ckpt.torch_dtype == dtype
        load_hf_weights(other, ckpt)
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.equal(other.state_dict()[key], value.to(dtype).float()), key


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_slices_merge_back_to_the_full_parameter(dist_ctx, tmp_path, tp):
    """Each rank's slice, merged by megatron's layout rules, is the unsplit parameter."""
    model_config, model = _tiny(dist_ctx, {**LLAMA, "num_key_value_heads": tp})
    full = model.state_dict()
    written = write_hf(tmp_path / "hf", full, model_config)
    with open_hf(written) as ckpt:
        for mapping in weight_mappings(model_config):
            slices = [
                read_rank_slice(
                    mapping, mapping.megatron, ckpt.tensors, model_config, rank=r, size=tp
                )
                for r in range(tp)
            ]
            part = partition_of(mapping.megatron, gated=True)
            if mapping.kind == "qkv":  # whole query groups per rank, in rank order
                merged = torch.cat(slices)
            else:
                merged = merge_tensor(slices, part) if part.dim is not None else slices[0]
            assert torch.equal(merged, full[mapping.megatron]), mapping.megatron


def _write_llama(tmp_path: Path, dist_ctx) -> tuple[Path, dict]:
    model_config, model = _tiny(dist_ctx, LLAMA)
    return write_hf(tmp_path / "hf", model.state_dict(), model_config), model.state_dict()


def test_a_config_that_lies_about_sizes_is_refused_before_allocation(dist_ctx, tmp_path):
    directory, _ = _write_llama(tmp_path, dist_ctx)
    config = json.loads((directory / "config.json").read_text())
    for key, value, expected in [
        ("num_hidden_layers", 1_000_000_000, "num_hidden_layers=1000000000 but the weights hold 2"),
        ("hidden_size", 10_000_000, "model.embed_tokens.weight has shape [96, 32]"),
        ("intermediate_size", 64, "gate_proj.weight has shape [48, 32] but config.json implies"),
        ("num_attention_heads", 0, "num_attention_heads must be a positive integer"),
    ]:
        (directory / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(HFFormatError, match=re.escape(expected)), open_hf(directory):
            pass


def test_missing_shard_truncated_file_and_unknown_tensors_are_named(dist_ctx, tmp_path):
    model_config, model = _tiny(dist_ctx, LLAMA)
    sharded = write_hf(tmp_path / "s", model.state_dict(), model_config, max_shard_bytes=20_000)
    second = sorted(sharded.glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(HFFormatError, match=second.name), open_hf(sharded):
        pass

    single = write_hf(tmp_path / "t", model.state_dict(), model_config)
    data = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HFFormatError, match=r"model\.safetensors"), open_hf(single):
        pass

    extra = write_hf(tmp_path / "u", model.state_dict(), model_config)
    tensors = {**_load(extra), "model.layers.0.mlp.extra.weight": torch.zeros(2)}
    save_file(tensors, str(extra / "model.safetensors"))
    target = _perturbed_copy(dist_ctx, model_config)
    unexpected = r"unexpected \['model.layers.0.mlp.extra"
    with open_hf(extra) as ckpt, pytest.raises(HFFormatError, match=unexpected):
        load_hf_weights(target, ckpt)

    missing = write_hf(tmp_path / "m", model.state_dict(), model_config)
    tensors = {k: v for k, v in _load(missing).items() if k != "model.norm.weight"}
    save_file(tensors, str(missing / "model.safetensors"))
    absent = r"missing \['model.norm.weight'\]"
    with open_hf(missing) as ckpt, pytest.raises(HFFormatError, match=absent):
        load_hf_weights(target, ckpt)


def _load(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_a_vocabulary_that_does_not_split_over_tp_is_refused(dist_ctx, tmp_path):
    directory, _ = _write_llama(tmp_path, dist_ctx)
    with open_hf(directory) as ckpt:
        assert ckpt.model_config_for(2).vocab_size == 96
        with pytest.raises(HFFormatError, match="num_key_value_heads=2 cannot be split"):
            ckpt.model_config_for(4)
        odd = ckpt.model_config.replace(vocab_size=97, make_vocab_size_divisible_by=1)
        with pytest.raises(HFFormatError, match="vocab_size=97 cannot be split evenly over 2"):
            dataclasses.replace(ckpt, model_config=odd).model_config_for(2)


def test_export_keeps_the_source_config_and_refuses_a_changed_architecture(dist_ctx, tmp_path):
    source = {**LLAMA, "bos_token_id": 1, "custom_key": [1, 2]}
    model_config = model_config_from_hf(source)
    kept = hf_config_from_model(model_config, dtype=torch.bfloat16, base=source)
    assert kept == {**source, "dtype": "bfloat16"}
    with pytest.raises(HFFormatError, match=r"num_layers: config\.json 2, model 3"):
        hf_config_from_model(model_config.replace(num_layers=3), dtype=torch.float32, base=source)
    gpt2_like = ModelConfig(normalization="LayerNorm", activation="gelu")
    with pytest.raises(HFFormatError, match="normalization 'LayerNorm'"):
        hf_config_from_model(gpt2_like, dtype=torch.float32)
