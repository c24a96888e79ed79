"""Data-parallel wrapping: megatron's ``DistributedDataParallel`` around a model chunk.

`wrap_ddp` puts a model in megatron's ``DistributedDataParallel`` (contiguous gradient buffers,
gradients reduced over the data-parallel group at the end of the step, optionally sharded for
the distributed optimizer) and wires the pipeline schedules to it (``no_sync_func`` so
accumulation steps skip the reduction, ``finalize_model_grads_func`` which reduces data-parallel
gradients and the tied-embedding gradients of the first and last pipeline stages).

The optimizer step itself is `align_core.trainer.loop.Trainer`'s (``train_step``), the one
production runs use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from align_core.model import unwrap_model

__all__ = ["DDPConfig", "wrap_ddp"]


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
