"""The dry run's activation estimate follows Korthikanti et al. (2022) under each recomputation."""

from __future__ import annotations

import pytest

from align_cli.plan import estimate_memory
from align_core import ModelConfig, ParallelConfig

# s=100, b=2 (micro 1 × 2 sequences), h=64, a=4, fp32 (twice the 16-bit bytes), 4 layers.
SBH = 100 * 2 * 64
PER_LAYER_FP32 = 2 * SBH * (34 + 5 * 4 * 100 / 64)  # 2 · 12,800 · 65.25 = 1,670,400


def _activations(parallel: ParallelConfig | None) -> int:
    model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=128)
    return estimate_memory(
        model,
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        micro_batch_size=1,
        seq_length=100,
        sequences_per_example=2,
        reference_strategy="precompute",
        parallel=parallel,
    ).activations


@pytest.mark.parametrize(
    ("recompute", "expected"),
    [
        ({}, 4 * PER_LAYER_FP32),
        ({"activations_checkpoint_granularity": "selective"}, 4 * 2 * 34 * SBH),
        # uniform, 1 layer per group: 4 layer inputs + one layer recomputed
        ({"activations_checkpoint_granularity": "full"}, 4 * 2 * 2 * SBH + PER_LAYER_FP32),
        # uniform, 2 layers per group: 2 group inputs + two layers recomputed
        (
            {"activations_checkpoint_granularity": "full", "activations_checkpoint_num_layers": 2},
            2 * 2 * 2 * SBH + 2 * PER_LAYER_FP32,
        ),
        # block of 3: 3 layer inputs, the 4th layer kept, one layer recomputed
        (
            {
                "activations_checkpoint_granularity": "full",
                "activations_checkpoint_method": "block",
                "activations_checkpoint_num_layers": 3,
            },
            3 * 2 * 2 * SBH + 2 * PER_LAYER_FP32,
        ),
    ],
)
def test_activation_estimate_by_recomputation(recompute, expected) -> None:
    assert PER_LAYER_FP32 == 1_670_400
    assert _activations(ParallelConfig(**recompute)) == int(expected)


def test_no_parallel_config_keeps_everything() -> None:
    assert _activations(None) == 4 * PER_LAYER_FP32
