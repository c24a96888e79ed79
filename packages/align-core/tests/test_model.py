import pytest
import torch

from align_core import ModelConfig, build_gpt_model, padded_vocab_size


def test_padded_vocab_size_follows_megatron_rule():
    assert padded_vocab_size(256, 128, 1) == 256
    assert padded_vocab_size(257, 128, 1) == 384
    assert padded_vocab_size(257, 128, 2) == 512
    assert padded_vocab_size(50257, 128, 8) == 51200


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="tanh")
    with pytest.raises(ValueError, match="num_query_groups"):
        ModelConfig(num_attention_heads=4, num_query_groups=3)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {
            "normalization": "LayerNorm",
            "activation": "gelu",
            "bias": True,
            "position_embedding_type": "learned_absolute",
            "share_embeddings_and_output_weights": True,
        },
        {"num_query_groups": 2, "activation": "squared-relu"},
    ],
)
def test_forward_backward_shapes(dist_ctx, changes):
    cfg = ModelConfig(**changes)
    model = build_gpt_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    mask = torch.triu(torch.ones(1, 1, 12, 12, dtype=torch.bool), 1)
    logits = model(ids, pos, mask)
    assert logits.shape == (2, 12, padded_vocab_size(cfg.vocab_size, 128, 1))
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_causal_model_ignores_future_tokens(dist_ctx):
    cfg = ModelConfig()
    model = build_gpt_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    other = ids.clone()
    other[0, 6:] = (other[0, 6:] + 1) % cfg.vocab_size
    pos = torch.arange(10)[None]
    mask = torch.triu(torch.ones(1, 1, 10, 10, dtype=torch.bool), 1)
    with torch.no_grad():
        a, b = model(ids, pos, mask), model(other, pos, mask)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_build_checks_the_layout_against_init_distributed(dist_ctx):
    from align_core import ParallelConfig

    with pytest.raises(ValueError, match="tensor_model_parallel_size=2 but initialised with 1"):
        build_gpt_model(ModelConfig(), ParallelConfig(tensor_model_parallel_size=2))
    assert build_gpt_model(ModelConfig(), ParallelConfig()).config.tensor_model_parallel_size == 1
