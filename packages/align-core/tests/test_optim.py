import functools
import math
import sys
from pathlib import Path

import pytest
import torch

from align_core import (
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    build_gpt_model,
    build_optimizer,
    forward_token_logps,
    learning_rate,
    seed_all,
    wrap_ddp,
)

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
import _common as c

FORWARD = functools.partial(forward_token_logps, vocab_size=256)


def test_warmup_is_linear_and_reaches_peak():
    sched = SchedulerConfig(style="constant", warmup_steps=4)
    lrs = [learning_rate(s, lr=1.0, schedule=sched, total_steps=10) for s in range(6)]
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decay_hits_midpoint_and_min():
    sched = SchedulerConfig(style="cosine", warmup_steps=2, min_lr=0.1)
    lr = functools.partial(learning_rate, lr=1.0, schedule=sched, total_steps=12)
    assert lr(2) == pytest.approx(1.0)
    assert lr(7) == pytest.approx(0.55)  # halfway through 10 decay steps: (1 + 0.1) / 2
    assert lr(4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr(12) == pytest.approx(0.1)
    assert lr(50) == pytest.approx(0.1)


def test_linear_decay_with_explicit_length():
    sched = SchedulerConfig(style="linear", decay_steps=4, min_lr=0.0)
    lr = functools.partial(learning_rate, lr=2.0, schedule=sched, total_steps=100)
    assert [lr(s) for s in range(6)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0, 0.0])


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="style"):
        SchedulerConfig(style="step")
    with pytest.raises(ValueError, match="betas"):
        OptimizerConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        OptimizerConfig(lr=-1.0)


def _batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 256, (2, 8), generator=g)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    return [{"tokens": tokens, "labels": labels}]


def _loss(batch, logps):
    return -logps.sum() / 2, {}


def test_optimizer_needs_ddp(dist_ctx):
    with pytest.raises(TypeError, match="DDP"):
        build_optimizer(build_gpt_model(ModelConfig()), OptimizerConfig(), clip_grad=1.0)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_step_matches_torch_adamw_with_clipping(dist_ctx, clip):
    """One megatron Adam step of the production trainer == torch AdamW on the same gradients
    (clipped by the global norm), with weight decay on matrices only."""
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    seed_all(31)
    model = wrap_ddp(build_gpt_model(ModelConfig()))
    optimizer = build_optimizer(model, cfg, clip_grad=clip)

    seed_all(31)
    twin = build_gpt_model(ModelConfig())
    logps = FORWARD(twin, _batch()[0])
    _loss(None, logps)[0].backward()
    grads = {n: p.grad.clone() for n, p in twin.named_parameters()}
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
    decay = [p for p in twin.parameters() if p.dim() > 1]
    no_decay = [p for p in twin.parameters() if p.dim() == 1]
    for p in twin.parameters():
        p.grad.mul_(scale)
    reference = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    reference.step()

    metrics = c.train_step(model, optimizer, _batch(), global_batch_size=2, lr=cfg.lr, clip=clip)
    assert metrics["skipped_steps"] == 0
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
    for (name, p), q in zip(model.module.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_config_asks_for_fp32_master_weights_gradients_and_moments():
    from align_core import to_transformer_config
    from align_core.optim import megatron_optimizer_config

    model = to_transformer_config(ModelConfig(dtype="bf16"))
    cfg = megatron_optimizer_config(
        model, OptimizerConfig(), clip_grad=1.0, use_distributed_optimizer=True
    )
    assert cfg.bf16 and not cfg.fp16 and cfg.params_dtype == torch.bfloat16
    assert cfg.loss_scale is None and not cfg.use_precision_aware_optimizer
    assert cfg.use_distributed_optimizer and cfg.clip_grad == 1.0
    dtypes = (cfg.main_params_dtype, cfg.main_grads_dtype, cfg.exp_avg_dtype, cfg.exp_avg_sq_dtype)
    assert dtypes == (torch.float32,) * 4


@pytest.mark.parametrize("distributed", [False, True])
def test_bf16_model_trains_fp32_master_weights(dist_ctx, distributed):
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params

    from align_core import DDPConfig

    seed_all(3)
    model = wrap_ddp(
        build_gpt_model(ModelConfig(dtype="bf16")),
        DDPConfig(use_distributed_optimizer=distributed),
    )
    optimizer = build_optimizer(model, OptimizerConfig(), clip_grad=1.0)
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    if distributed:
        assert all(isinstance(o, DistributedOptimizer) for o in inners)
        mains = [p for o in inners for g in o.shard_fp32_from_float16_groups for p in g]
    else:
        assert all(isinstance(o, Float16OptimizerWithFloat16Params) for o in inners)
        mains = [p for o in inners for g in o.fp32_from_float16_groups for p in g]
    assert len(mains) == len(list(model.parameters()))
    assert all(p.dtype == torch.float32 for p in mains)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.main_grad.dtype == torch.float32 for p in model.parameters())
