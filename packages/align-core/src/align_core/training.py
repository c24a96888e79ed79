"""Data-parallel wrapping and one optimizer step.

`wrap_ddp` puts a model in megatron's ``DistributedDataParallel`` (contiguous gradient buffers,
gradients reduced over the data-parallel group at the end of the step, optionally sharded for
the distributed optimizer) and wires the pipeline schedules to it (``no_sync_func`` so
accumulation steps skip the reduction, ``finalize_model_grads_func`` which reduces data-parallel
gradients and the tied-embedding gradients of the first and last pipeline stages).

`train_step` = zero gradients → `align_core.schedule.forward_backward` → set the learning rate →
``optimizer.step()`` (unscale, global-norm clipping, Adam update, distributed-optimizer
all-gather) and reports the gradient norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from align_core.model import unwrap_model
from align_core.optim import set_learning_rate
from align_core.schedule import Batch, ForwardFn, LossFn, forward_backward

__all__ = ["DDPConfig", "StepResult", "train_step", "wrap_ddp"]


@dataclass(frozen=True)
class DDPConfig:
    """megatron DDP settings.

    Attributes:
        use_distributed_optimizer: Shard optimizer state and master weights over data-parallel
            ranks (ZeRO-1); gradients are reduce-scattered instead of all-reduced.
        overlap_grad_reduce: Start bucket reductions during the backward pass.
        grad_reduce_in_fp32: Accumulate and reduce gradients in fp32 for bf16/fp16 models.
        bucket_size: Elements per reduction bucket; None lets megatron choose.
    """

    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    grad_reduce_in_fp32: bool = True
    bucket_size: int | None = None


def wrap_ddp(model: torch.nn.Module, config: DDPConfig = DDPConfig()) -> Any:
    """Wrap this rank's model chunk in megatron's ``DistributedDataParallel``.

    Gradients then live in ``param.main_grad`` (the contiguous buffer); they are averaged over
    the data-parallel group by ``finalize_model_grads`` at the end of `forward_backward`.

    Args:
        model: The chunk from `align_core.model.build_gpt_model`.
        config: DDP settings.

    Returns:
        The ``DistributedDataParallel`` module (``.module`` is ``model``).
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    transformer_config = unwrap_model(model).config
    ddp = DistributedDataParallel(
        config=transformer_config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=config.grad_reduce_in_fp32,
            overlap_grad_reduce=config.overlap_grad_reduce,
            use_distributed_optimizer=config.use_distributed_optimizer,
            bucket_size=config.bucket_size,
        ),
        module=model,
    )
    transformer_config.no_sync_func = ddp.no_sync
    transformer_config.finalize_model_grads_func = finalize_model_grads
    if config.overlap_grad_reduce:
        transformer_config.grad_sync_func = ddp.start_grad_sync
    return ddp


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports.

    Attributes:
        outputs: Per-micro-batch metrics from ``loss_fn`` (last pipeline stage; empty elsewhere).
        grad_norm: Global gradient norm before clipping (all ranks agree); None when the step
            was skipped because of a non-finite gradient (fp16 loss scaling).
        update_successful: False when the optimizer skipped the update.
        learning_rate: The learning rate used.
    """

    outputs: list[dict[str, Tensor]]
    grad_norm: float | None
    update_successful: bool
    learning_rate: float


def train_step(
    model: Any,
    optimizer: Any,
    micro_batches: Sequence[Batch],
    forward_fn: ForwardFn,
    loss_fn: LossFn,
    *,
    lr: float,
) -> StepResult:
    """One optimizer step over the micro-batches of one global batch (this rank's share).

    Args:
        model: The `wrap_ddp` module.
        optimizer: The `align_core.optim.build_optimizer` optimizer.
        micro_batches: This data-parallel rank's micro-batches (gradient accumulation).
        forward_fn: Per-micro-batch forward (see `align_core.schedule.forward_backward`).
        loss_fn: Per-micro-batch loss under the global-batch normalisation contract.
        lr: Learning rate of this step (`align_core.optim.learning_rate`).

    Returns:
        The `StepResult`.
    """
    model.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = forward_backward(model, micro_batches, forward_fn, loss_fn)
    set_learning_rate(optimizer, lr)
    update_successful, grad_norm, _ = optimizer.step()
    return StepResult(
        outputs=outputs,
        grad_norm=None if grad_norm is None else float(grad_norm),
        update_successful=bool(update_successful),
        learning_rate=lr,
    )
