"""The forward pass distillation needs: this rank's vocabulary slice of the logits.

Teacher and student both run `logits_forward` through `align_core.schedule.forward_backward`:
on the last pipeline stage it returns the ``[B, S, V_local]`` logits of this tensor-parallel
rank's vocabulary slice (megatron's ``parallel_output``), on the other stages the activations
the pipeline sends on.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from align_core.device import module_device, to_device
from align_core.logprobs import causal_attention_mask, tensor_parallel_group, vocab_shard_start
from align_core.model import unwrap_model

__all__ = ["logits_forward", "tensor_group_of", "vocab_start_of"]


def logits_forward(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Run one micro-batch: logits on the last pipeline stage, activations elsewhere.

    Inputs are moved to the model's device first (`align_core.device.to_device`; a no-op for
    batches `align_core.schedule.forward_backward` has already moved).

    Args:
        model: This rank's model chunk (possibly DDP / Float16Module wrapped).
        batch: ``tokens [B, S]``, optional ``position_ids [B, S]`` (default ``0..S-1``) and
            ``attention_mask`` (default causal).

    Returns:
        ``[B, S, V_local]`` logits (last stage) or ``[S, B, H]`` activations.
    """
    device = module_device(model)
    inputs = to_device(
        {k: batch[k] for k in ("tokens", "position_ids", "attention_mask") if k in batch}, device
    )
    tokens = inputs["tokens"]
    seq = tokens.shape[-1]
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).expand_as(tokens)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = causal_attention_mask(seq, device)
    return model(tokens, position_ids, mask)


def tensor_group_of(model: torch.nn.Module) -> torch.distributed.ProcessGroup | None:
    """The model's tensor-parallel group, or None when it has a single rank."""
    group = tensor_parallel_group(unwrap_model(model))
    return group if group is not None and group.size() > 1 else None


def vocab_start_of(logits: Tensor, group: torch.distributed.ProcessGroup | None) -> int:
    """First global vocabulary id of this rank's slice of ``logits``."""
    return vocab_shard_start(logits.shape[-1], group)
