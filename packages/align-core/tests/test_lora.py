"""LoRA adapters on a single-process megatron GPT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from align_core import ModelConfig, build_gpt_model
from align_core.lora import (
    LoraConfig,
    _fused_norm_input,
    add_lora,
    load_lora,
    lora_adapters,
    lora_disabled,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_lora,
)
from align_core.nemo import load_nemo_weights, open_nemo, random_state_dict, write_tiny_nemo

CFG = ModelConfig(vocab_size=300, num_query_groups=2, seq_length=32)
LORA = LoraConfig(rank=4, alpha=8.0)


def _inputs():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, 12), generator=gen)
    pos = torch.arange(12).expand(2, 12)
    mask = torch.triu(torch.ones(1, 1, 12, 12, dtype=torch.bool), 1)
    return ids, pos, mask


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(*_inputs())


def _model(seed: int = 0):
    model = build_gpt_model(CFG.replace(vocab_size=384))
    model.load_state_dict(random_state_dict(CFG, seed=seed))
    return model


def _perturb(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_adapters_start_as_identity_and_only_they_train(dist_ctx):
    model = _model()
    base = _logits(model)
    names = add_lora(model, LORA)
    assert len(names) == CFG.num_layers * 4
    assert "decoder.layers.1.mlp.linear_fc1_lora" in names
    assert torch.equal(_logits(model), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "ab"}
    adapters = lora_adapters(model)
    qkv = adapters["decoder.layers.0.self_attention.linear_qkv_lora"]
    proj = adapters["decoder.layers.0.self_attention.linear_proj_lora"]
    fc1 = adapters["decoder.layers.0.mlp.linear_fc1_lora"]
    assert qkv.lora_a.shape == (4, 64) and qkv.lora_b.shape == (64 + 2 * 2 * 16, 4)
    assert proj.lora_a.shape == (4, 64) and proj.lora_b.shape == (64, 4)
    assert fc1.lora_b.shape == (2 * CFG.ffn_hidden_size, 4) and fc1.gated
    assert torch.count_nonzero(qkv.lora_b) == 0 and torch.count_nonzero(qkv.lora_a) > 0


def test_gradients_reach_only_adapters(dist_ctx):
    model = _model()
    add_lora(model, LORA)
    model.train()
    model(*_inputs()).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if "_lora." in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # with B = 0 the gradient reaches B, not A
    qkv = lora_adapters(model)["decoder.layers.0.self_attention.linear_qkv_lora"]
    assert qkv.lora_b.grad.abs().sum() > 0
    assert qkv.lora_a.grad.abs().sum() == 0


def test_disable_merge_and_equivalence(dist_ctx, tmp_path):
    model = _model()
    base = _logits(model)
    add_lora(model, LORA)
    _perturb(model)
    adapted = _logits(model)
    assert not torch.allclose(adapted, base, atol=1e-4)
    with lora_disabled(model):
        assert torch.equal(_logits(model), base)
    assert torch.equal(_logits(model), adapted)  # re-enabled
    with pytest.raises(RuntimeError), lora_disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(_logits(model), adapted)

    # the adapted linear equals W + scale * B A applied to the input
    adapter = lora_adapters(model)["decoder.layers.1.mlp.linear_fc2_lora"]
    base_fc2 = model.decoder.layers[1].mlp.linear_fc2
    x = torch.randn(3, 1, CFG.ffn_hidden_size)
    with torch.no_grad():
        got = base_fc2(x)[0]
        want = F.linear(x, base_fc2.weight + 2.0 * adapter.lora_b @ adapter.lora_a)
    torch.testing.assert_close(got, want)

    assert merge_lora(model) == CFG.num_layers * 4
    assert lora_adapters(model) == {}
    assert not any("_lora" in k for k in model.state_dict())
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-5, atol=1e-5)


def test_adapter_only_checkpoint(dist_ctx, tmp_path):
    model = _model()
    add_lora(model, LORA)
    _perturb(model, seed=5)
    adapted = _logits(model)
    path = save_lora(model, tmp_path / "adapters.pt", LORA)
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == set(lora_state_dict(model))
    assert not any(k.startswith("embedding") for k in saved["state_dict"])

    other = _model()
    add_lora(other, LoraConfig(rank=4, alpha=8.0, seed=99))
    assert load_lora(other, path) == LORA
    assert torch.equal(_logits(other), adapted)


def test_base_weights_load_around_adapters(dist_ctx, tmp_path):
    path = write_tiny_nemo(tmp_path / "a.nemo", CFG, seed=4)
    model = build_gpt_model(CFG.replace(vocab_size=384))
    add_lora(model, LORA)
    with open_nemo(path) as ckpt:
        load_nemo_weights(model, ckpt)  # strict, adapters untouched
    assert torch.equal(_logits(model), _logits(_model(seed=4)))


def test_dropout_only_in_training(dist_ctx):
    model = _model()
    add_lora(model, LoraConfig(rank=4, dropout=0.5))
    _perturb(model)
    adapted = _logits(model)
    model.train()
    with torch.no_grad():
        noisy = model(*_inputs())
    assert not torch.allclose(noisy, adapted)
    assert torch.equal(_logits(model), adapted)


def test_sharded_state_dict_declares_adapter_axes(dist_ctx):
    model = _model()
    add_lora(model, LORA)
    sharded = model.sharded_state_dict()
    qkv_b = sharded["decoder.layers.0.self_attention.linear_qkv_lora.lora_b"]
    proj_a = sharded["decoder.layers.0.self_attention.linear_proj_lora.lora_a"]
    assert qkv_b.key == "decoder.layers.self_attention.linear_qkv_lora.lora_b"
    assert tuple(qkv_b.global_shape) == (CFG.num_layers, 128, 4)
    assert tuple(proj_a.global_shape) == (CFG.num_layers, 4, 64)
    assert "decoder.layers.1.mlp.linear_fc1_lora.lora_b" in sharded  # swiglu factory


@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_fused_norm_input_matches_a_separate_norm(norm):
    class FakeTELinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer_norm_weight = torch.nn.Parameter(torch.rand(8) + 0.5)
            self.layer_norm_bias = (
                torch.nn.Parameter(torch.randn(8)) if norm == "LayerNorm" else None
            )
            self.normalization = norm
            self.eps = 1e-5

    fake = FakeTELinear()
    x = torch.randn(3, 2, 8)
    if norm == "RMSNorm":
        want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * fake.layer_norm_weight
    else:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        want = (x - mean) / torch.sqrt(var + 1e-5) * fake.layer_norm_weight + fake.layer_norm_bias
    torch.testing.assert_close(_fused_norm_input(fake, x), want)
    plain = torch.nn.Linear(8, 8)
    assert _fused_norm_input(plain, x) is x


def test_config_validation():
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig(target_modules=("linear_q",))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    assert LoraConfig(rank=8, alpha=16).scale == 2.0


def test_adapters_round_trip_through_a_distributed_checkpoint(dist_ctx, tmp_path):
    from megatron.core import dist_checkpointing

    model = _model()
    add_lora(model, LORA)
    _perturb(model, seed=8)
    adapted = _logits(model)
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "ckpt"))
    other = _model(seed=1)
    add_lora(other, LORA)
    loaded = dist_checkpointing.load(other.sharded_state_dict(), str(tmp_path / "ckpt"))
    other.load_state_dict(loaded)
    assert torch.equal(_logits(other), adapted)
