"""Optimizer (megatron's, distributed optimizer included) and learning-rate schedules.

`build_optimizer` wraps `megatron.core.optimizer.get_megatron_optimizer` for Adam(W) with
gradient clipping by the global norm; precision follows the model (`megatron_optimizer_config`):
fp32 models get megatron's ``FP32Optimizer``; bf16 models ``Float16OptimizerWithFloat16Params``
(or, wrapped with ``DDPConfig(use_distributed_optimizer=True)``, the ``DistributedOptimizer``)
with fp32 master weights, fp32 gradients and fp32 Adam moments, and no loss scaling; fp16 models
the same with dynamic loss scaling. On GPU the inner Adam is Transformer Engine's (or Apex's)
fused Adam when installed, torch's AdamW otherwise. Weight decay skips biases and norms
(megatron's default parameter groups).

The learning-rate schedule is a pure function of the optimizer step (`learning_rate`), so its
only state is the step counter the trainer checkpoints: linear warm-up, then cosine, linear or
constant decay to ``min_lr``, then ``min_lr``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from align_core.model import unwrap_model

__all__ = [
    "OptimizerConfig",
    "SchedulerConfig",
    "build_optimizer",
    "learning_rate",
    "megatron_optimizer_config",
    "set_learning_rate",
]


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam(W) settings (NeMo's ``model.optim``).

    Attributes:
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (not applied to biases and norms).
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
        loss_scale: Static fp16 loss scale; None means dynamic scaling (fp16 only).
    """

    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    loss_scale: float | None = None

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate schedule (NeMo's ``model.optim.sched``).

    Attributes:
        style: Decay after warm-up: ``cosine``, ``linear`` or ``constant``.
        warmup_steps: Steps of linear warm-up; step ``s < warmup_steps`` gets
            ``lr · (s + 1) / warmup_steps``.
        decay_steps: Steps of decay after warm-up; None decays over all remaining steps.
        min_lr: Learning rate at the end of the decay and after it.
    """

    style: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.style not in ("cosine", "linear", "constant"):
            raise ValueError(f"style: {self.style!r} is not cosine, linear or constant")
        if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 0):
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if self.min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {self.min_lr}")


def learning_rate(step: int, *, lr: float, schedule: SchedulerConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Args:
        step: Number of optimizer steps already taken.
        lr: Peak learning rate.
        schedule: Warm-up and decay.
        total_steps: Steps of the whole run (sets the decay length when
            ``schedule.decay_steps`` is None).

    Returns:
        The learning rate to use for this step.
    """
    if step < schedule.warmup_steps:
        return lr * (step + 1) / schedule.warmup_steps
    if schedule.style == "constant":
        return lr
    decay = schedule.decay_steps
    if decay is None:
        decay = total_steps - schedule.warmup_steps
    if decay <= 0:
        return schedule.min_lr
    progress = min(1.0, (step - schedule.warmup_steps) / decay)
    if schedule.style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule.min_lr + (lr - schedule.min_lr) * factor


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Set ``lr`` on every parameter group (times the group's ``lr_mult`` when it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def megatron_optimizer_config(
    model_config: Any,
    config: OptimizerConfig,
    *,
    clip_grad: float,
    use_distributed_optimizer: bool,
) -> Any:
    """The megatron ``OptimizerConfig`` for a model: Adam(W), precision from the model.

    bf16/fp16 models train fp32 master weights (``main_params_dtype``) from fp32 gradients
    (``main_grads_dtype``, which `align_core.training.DDPConfig.grad_reduce_in_fp32` accumulates)
    with fp32 Adam moments; megatron's precision-aware optimizer (moments or master weights in
    lower precision) stays off. fp16 gets dynamic loss scaling unless ``config.loss_scale``.

    Args:
        model_config: The model's megatron ``TransformerConfig`` (``bf16``, ``fp16``,
            ``params_dtype``).
        config: Adam settings.
        clip_grad: Clip the global gradient norm to this (<= 0 disables clipping).
        use_distributed_optimizer: Shard optimizer state over data-parallel ranks (the DDP
            wrapper's setting).

    Returns:
        A ``megatron.core.optimizer.OptimizerConfig``.
    """
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=config.lr,
        min_lr=0.0,
        weight_decay=config.weight_decay,
        adam_beta1=config.betas[0],
        adam_beta2=config.betas[1],
        adam_eps=config.eps,
        bf16=model_config.bf16,
        fp16=model_config.fp16,
        params_dtype=model_config.params_dtype,
        main_params_dtype=torch.float32,
        main_grads_dtype=torch.float32,
        exp_avg_dtype=torch.float32,
        exp_avg_sq_dtype=torch.float32,
        use_precision_aware_optimizer=False,
        loss_scale=config.loss_scale,
        use_distributed_optimizer=use_distributed_optimizer,
        clip_grad=max(clip_grad, 0.0),
    )


def build_optimizer(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    config: OptimizerConfig,
    *,
    clip_grad: float,
) -> Any:
    """Megatron's Adam optimizer over DDP-wrapped model chunks.

    The distributed optimizer (optimizer state sharded over data-parallel ranks) is used when the
    chunks were wrapped with ``DDPConfig(use_distributed_optimizer=True)``.

    Args:
        model_chunks: The `align_core.training.wrap_ddp` result (or a list of them).
        config: Adam settings.
        clip_grad: Clip the global gradient norm to this (<= 0 disables clipping); the trainer
            passes its ``gradient_clip_val``.

    Returns:
        A megatron ``MegatronOptimizer`` (``ChainedOptimizer``); ``step()`` returns
        ``(update_successful, grad_norm, num_zeros)``.
    """
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import get_megatron_optimizer

    given = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    chunks = [c for c in given if isinstance(c, DistributedDataParallel)]
    if len(chunks) < len(given):
        raise TypeError("build_optimizer needs DDP-wrapped chunks (align_core.training.wrap_ddp)")
    model_config = unwrap_model(chunks[0]).config
    megatron_config = megatron_optimizer_config(
        model_config,
        config,
        clip_grad=clip_grad,
        use_distributed_optimizer=chunks[0].ddp_config.use_distributed_optimizer,
    )
    # A fresh list, so that it is typed as megatron's List[MegatronModule] (lists are invariant).
    optimizer = get_megatron_optimizer(megatron_config, [*chunks])
    # megatron marks biases and norms with wd_mult = 0 but leaves applying it to its own LR
    # scheduler, which align does not use.
    for group in optimizer.param_groups:
        group["weight_decay"] = config.weight_decay * group.get("wd_mult", 1.0)
    if model_config.fp16:
        # The schedules multiply each micro-batch loss by the current loss scale.
        for chunk in chunks:
            unwrap_model(chunk).config.grad_scale_func = optimizer.scale_loss
    return optimizer
