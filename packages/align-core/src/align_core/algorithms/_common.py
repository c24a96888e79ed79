"""Pieces every algorithm module shares: model-batch layout helpers and reductions.

The step protocol (`AlgorithmStep`) and the `ModelBatch` alias are public, in
`align_core.algorithms.contract`; they are re-exported here for the algorithm modules.

A *model batch* is a ``dict[str, Tensor]`` that `align_core.schedule.forward_backward` hands to
the forward (``tokens``, ``labels``, ``position_ids``, ``attention_mask``) and then to the
algorithm's loss function. Besides the forward inputs it carries:

- ``segment_ids [R, S]`` (int64): for each scored label, the index of the *sequence* it belongs
  to (``0 .. N-1``), ``-1`` where nothing is scored. Padded batches use the row index; packed
  batches give every packed sequence its own index. Per-sequence log-probs are the sums of token
  log-probs over a segment, so the losses are computed the same way padded or packed.
- ``seq_token_counts [N]`` (float32): scored tokens per sequence (for averaged log-probs).
- ``sample_index [b]`` (int64): dataset index of each example (the reference cache key).
- ``ref_logps [N]`` (float32): reference per-sequence *summed* log-probs, added by the trainer
  after the reference pass.
- algorithm-specific fields (ground-truth rewards, desirable flags, ...).

Labels are aligned with positions: ``labels[:, t]`` is the token predicted at position ``t``
(the next token), ``-100`` where not scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from align_core.algorithms.contract import IGNORE_INDEX, AlgorithmStep, ModelBatch

__all__ = [
    "IGNORE_INDEX",
    "AlgorithmStep",
    "ModelBatch",
    "batch_device",
    "pad_model_batch",
    "padded_model_batch",
    "padded_segment_ids",
    "segment_sums",
    "sum_metrics",
    "upcast",
]


def batch_device(micro_batches: Sequence[ModelBatch]) -> torch.device:
    """The device the micro-batches live on (their first tensor's); CPU when there are none.

    Tensors an algorithm creates for a step (normalisers, counts it reduces) go there.
    """
    for batch in micro_batches[:1]:
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return value.device
    return torch.device("cpu")


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 when it is half precision (float32/float64 unchanged)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def segment_sums(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Sum ``values`` per segment (differentiable).

    Args:
        values: ``[R, S]`` per-token values (0 where unscored is not required).
        segment_ids: ``[R, S]`` segment index of each position, ``-1`` to leave it out.
        num_segments: N.

    Returns:
        ``[N]`` sums (in ``values``' dtype).
    """
    flat = values.reshape(-1)
    seg = segment_ids.reshape(-1)
    keep = seg >= 0
    out = flat.new_zeros(num_segments)
    return out.index_add(0, seg.clamp(min=0), torch.where(keep, flat, torch.zeros_like(flat)))


def padded_segment_ids(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Segment ids of a padded batch: the row index where a label is scored, ``-1`` elsewhere."""
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    return torch.where(labels != ignore_index, rows, torch.full_like(rows, -1))


def padded_model_batch(
    input_ids: Tensor, labels: Tensor, position_ids: Tensor, lengths: Tensor
) -> ModelBatch:
    """The model batch of a right-padded collated batch (one sequence per row).

    The attention mask is left out: the forward then uses the causal mask, and right padding
    never influences real positions.
    """
    return {
        "tokens": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": padded_segment_ids(labels),
        "seq_token_counts": (labels != IGNORE_INDEX).sum(-1).float(),
        "lengths": lengths,
    }


def pad_model_batch(batch: ModelBatch, length: int, *, pad_id: int) -> ModelBatch:
    """Right-pad a padded model batch's rows to ``length`` (no-op when already that long).

    Pipeline parallelism exchanges activations of one fixed shape, so there every micro-batch
    of a step is padded to the step's longest row (`align_core.trainer.data.TrainData`).
    """
    extra = length - batch["tokens"].shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad rows of {batch['tokens'].shape[-1]} to {length}")
    if extra == 0:
        return batch
    out = dict(batch)
    pad = torch.nn.functional.pad
    out["tokens"] = pad(batch["tokens"], (0, extra), value=pad_id)
    out["labels"] = pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    out["segment_ids"] = pad(batch["segment_ids"], (0, extra), value=-1)
    start = batch["position_ids"][..., -1:] + 1
    tail = start + torch.arange(extra, device=start.device)
    out["position_ids"] = torch.cat([batch["position_ids"], tail], dim=-1)
    if "attention_mask" in batch:
        raise ValueError("pad_model_batch: batches with an explicit attention mask are packed")
    return out


def sum_metrics(outputs: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Sum scalar metric tensors over micro-batches (keys of the first output)."""
    if not outputs:
        return {}
    return {k: torch.stack([o[k].reshape(()) for o in outputs]).sum() for k in outputs[0]}
