"""Forward/backward over micro-batches through megatron's pipeline schedules.

`forward_backward` runs ``forward_fn`` then ``loss_fn`` on each micro-batch and back-propagates,
with any pipeline-parallel size (megatron's 1F1B schedule when PP > 1). Algorithms (DPO, KTO,
SFT, KD) plug in a ``loss_fn``; the forward is usually `align_core.logprobs.forward_token_logps`.

Loss contract. ``loss_fn(batch, output) -> (loss, metrics)`` returns, for its micro-batch, the
loss **already scaled so that summing it over all micro-batches and all data-parallel ranks gives
the global-batch objective** — e.g. ``per_example_losses.sum() / global_batch_size``. This makes
micro-batch 1 × accumulation 4 equal micro-batch 4 × accumulation 1 exactly, whatever the
micro-batch sizes or token counts. megatron divides each micro-batch loss by the number of
micro-batches (and multiplies it by the context-parallel size), and megatron DDP averages
gradients over the data-parallel(×context-parallel) group; `forward_backward` multiplies the
loss it hands to megatron by the inverse of those factors, so the gradients are exactly those
of the sum. ``metrics`` (a dict of tensors, e.g. per-example log-probs or rewards) are returned
as given, from the last pipeline stage; `broadcast_from_last_stage` sends them to the other
stages.

Data. Every rank of a pipeline and of a tensor-parallel group gets the same list of
micro-batches (they are small; only the first stage reads the tokens and only the last the
labels). With PP > 1 all micro-batches must have the same ``[B, S]`` shape (activations are
exchanged with fixed shapes). Micro-batches may live on the host: each is moved to the model's
device (`align_core.device.to_device`) just before its forward, so ``forward_fn`` and ``loss_fn``
always see device tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from align_core.device import module_device, to_device
from align_core.model import unwrap_model

__all__ = [
    "ForwardFn",
    "LossFn",
    "broadcast_from_last_stage",
    "concat_outputs",
    "forward_backward",
    "grad_reduction_divisor",
]

Batch = Mapping[str, Tensor]
ForwardFn = Callable[[torch.nn.Module, Batch], Tensor]
"""``(model, batch) -> output``: label log-probs on the last stage, activations on the others."""
LossFn = Callable[[Batch, Tensor], tuple[Tensor | None, Mapping[str, Tensor]]]
"""``(batch, output) -> (loss, metrics)``; the loss may be None when ``forward_only``."""


def grad_reduction_divisor(model: torch.nn.Module) -> int:
    """How much megatron DDP divides summed gradients by (1 when the model is not DDP-wrapped).

    Raises:
        ValueError: When the model's config asks for per-token loss scaling, whose gradient
            normalisation the loss contract of this module does not use.
    """
    from megatron.core.distributed import DistributedDataParallel

    if unwrap_model(model).config.calculate_per_token_loss:
        raise ValueError("calculate_per_token_loss is not supported: normalise in loss_fn")
    if isinstance(model, DistributedDataParallel):
        return model.dp_cp_group.size()
    return 1


def _context_parallel_size(model: torch.nn.Module) -> int:
    return unwrap_model(model).config.context_parallel_size


def forward_backward(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    micro_batches: Sequence[Batch],
    forward_fn: ForwardFn,
    loss_fn: LossFn,
    *,
    forward_only: bool = False,
) -> list[dict[str, Tensor]]:
    """Forward (and backward) every micro-batch through megatron's schedule.

    Gradients accumulate into the parameters (``main_grad`` under megatron DDP, ``grad``
    otherwise); with DDP the data-parallel reduction runs at the end (``finalize_model_grads``).
    Zeroing gradients and stepping the optimizer are the caller's
    (`align_core.trainer.loop.Trainer`).

    Args:
        model: This rank's model chunk (or a one-element list of it), DDP-wrapped for training
            with data parallelism.
        micro_batches: The micro-batches of one step (gradient accumulation = their number), on
            the host or on the model's device (each is moved there before its forward).
        forward_fn: ``(model, batch) -> output``, e.g. a `functools.partial` of
            `align_core.logprobs.forward_token_logps`.
        loss_fn: ``(batch, output) -> (loss, metrics)`` under the contract in the module
            docstring; runs on the last pipeline stage only.
        forward_only: No backward; runs under ``torch.no_grad`` (evaluation, reference passes).

    Returns:
        On the last pipeline stage, each micro-batch's ``metrics`` (with the unscaled ``loss``
        added under ``"loss"`` when it is not already there and not None); an empty list on the
        other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(model) if isinstance(model, Sequence) else [model]
    if len(chunks) != 1:
        raise ValueError("virtual pipeline stages (several model chunks) are not supported")
    if not micro_batches:
        raise ValueError("no micro-batches")
    chunk = chunks[0]
    num_micro = len(micro_batches)
    # Undo megatron's `loss /= num_microbatches`, `loss *= cp_size` and DDP's gradient mean.
    scale = num_micro * grad_reduction_divisor(chunk) / _context_parallel_size(chunk)
    batch_size, seq_length = micro_batches[0]["tokens"].shape
    device = module_device(chunk)

    def step(data: Iterator[Batch], module: torch.nn.Module):
        batch = to_device(next(data), device)
        output = forward_fn(module, batch)
        return output, functools.partial(_megatron_loss, loss_fn, scale, batch)

    run = get_forward_backward_func()
    grad_mode = torch.no_grad() if forward_only else torch.enable_grad()
    with grad_mode:
        outputs = run(
            forward_step_func=step,
            data_iterator=iter(micro_batches),
            model=chunks,
            num_microbatches=num_micro,
            seq_length=seq_length,
            micro_batch_size=batch_size,
            forward_only=forward_only,
        )
    return list(outputs)


def _megatron_loss(
    loss_fn: LossFn, scale: float, batch: Batch, output: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    loss, metrics = loss_fn(batch, output)
    metrics = dict(metrics)
    if loss is None:
        return output.new_zeros(()), metrics
    metrics.setdefault("loss", loss.detach())
    return loss * scale, metrics


def concat_outputs(outputs: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Join per-micro-batch metrics.

    Tensors with a batch dimension are concatenated; scalars are stacked into
    ``[num_micro_batches]``.
    """
    if not outputs:
        return {}
    joined = {}
    for key in outputs[0]:
        values = [o[key] for o in outputs]
        joined[key] = torch.stack(values) if values[0].dim() == 0 else torch.cat(values)
    return joined


def broadcast_from_last_stage(
    tensors: Mapping[str, Tensor] | None,
    *,
    group: dist.ProcessGroup | None,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Send a dict of tensors from the last rank of a pipeline group to all its ranks.

    Args:
        tensors: The dict on the last stage (e.g. `concat_outputs` of `forward_backward`'s
            result); ignored (may be None) elsewhere.
        group: The pipeline-parallel group; None or a group of one returns ``tensors`` as is.
        device: Where received tensors are allocated (the communication device of ``group``).

    Returns:
        The same dict on every rank of ``group``.
    """
    if group is None or group.size() == 1:
        return dict(tensors or {})
    src = dist.get_global_rank(group, group.size() - 1)
    is_src = group.rank() == group.size() - 1
    spec = [[(k, tuple(v.shape), v.dtype) for k, v in (tensors or {}).items()] if is_src else None]
    dist.broadcast_object_list(spec, src=src, group=group, device=torch.device(device))
    received = {}
    entries = spec[0]
    assert entries is not None  # the broadcast filled it on every rank
    for key, shape, dtype in entries:
        if is_src:
            assert tensors is not None  # the source has entries only when it has tensors
            buf = tensors[key].detach().to(device).contiguous()
        else:
            buf = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(buf, src=src, group=group)
        received[key] = buf
    return received
