"""Activation recomputation changes memory, never numbers: gradients equal keeping everything."""

from __future__ import annotations

import pytest
import torch

from align_core import ModelConfig, ParallelConfig, build_gpt_model
from align_core.config import to_transformer_config
from align_core.rng import seed_all


def _gradients(model_cfg: ModelConfig, parallel: ParallelConfig) -> list[torch.Tensor]:
    seed_all(7)
    model = build_gpt_model(model_cfg, parallel)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (3, 16), generator=generator)
    pos = torch.arange(16).expand(3, 16)
    mask = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), 1)
    seed_all(11)  # the same dropout masks in every variant (recomputation must replay them)
    logits = model(ids, pos, attention_mask=mask)
    logits.float().log_softmax(-1).gather(-1, ids[..., None]).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "recompute",
    [
        {"activations_checkpoint_granularity": "selective"},
        {"activations_checkpoint_granularity": "full"},
        {"activations_checkpoint_granularity": "full", "activations_checkpoint_num_layers": 3},
        {
            "activations_checkpoint_granularity": "full",
            "activations_checkpoint_method": "block",
            "activations_checkpoint_num_layers": 2,
        },
    ],
)
def test_recomputation_gives_the_same_gradients_with_dropout(dist_ctx, recompute):
    cfg = ModelConfig(num_layers=3, hidden_dropout=0.2, attention_dropout=0.2)
    kept = _gradients(cfg, ParallelConfig())
    recomputed = _gradients(cfg, ParallelConfig(**recompute))
    assert len(kept) == len(recomputed)
    for a, b in zip(kept, recomputed, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_recompute_settings_reach_megatron():
    full = ParallelConfig(
        activations_checkpoint_granularity="full",
        activations_checkpoint_method="block",
        activations_checkpoint_num_layers=2,
    )
    config = to_transformer_config(ModelConfig(num_layers=4), full)
    assert (config.recompute_granularity, config.recompute_method) == ("full", "block")
    assert config.recompute_num_layers == 2
    none = to_transformer_config(ModelConfig(), ParallelConfig())
    assert none.recompute_granularity is None and none.recompute_method is None


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"activations_checkpoint_granularity": "layers"}, "activations_checkpoint_granularity"),
        ({"activations_checkpoint_method": "every"}, "activations_checkpoint_method"),
        ({"activations_checkpoint_num_layers": 0}, "activations_checkpoint_num_layers"),
    ],
)
def test_bad_recompute_settings_name_the_key(changes, key):
    with pytest.raises(ValueError, match=key):
        ParallelConfig(**changes)


@pytest.mark.parametrize(("method", "layers"), [("uniform", 2), ("block", 4)])
def test_recompute_layers_must_fit_a_stage(method, layers):
    parallel = ParallelConfig(
        activations_checkpoint_granularity="full",
        activations_checkpoint_method=method,
        activations_checkpoint_num_layers=layers,
    )
    with pytest.raises(ValueError, match="3 layers of each pipeline stage"):
        to_transformer_config(ModelConfig(num_layers=3), parallel)
