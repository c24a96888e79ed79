"""Typed batches: what collate functions return and trainers consume.

Conventions shared by every batch (Megatron's):

- ``input_ids[i, t]`` predicts ``labels[i, t]``: a sequence of ``L`` tokens gives ``L - 1``
  input positions, ``input_ids = seq[:-1]`` and ``labels = seq[1:]``, so labels are already
  shifted and align with the logits. A label is ``-100`` exactly where its target token is a
  prompt token or padding; the number of real labels in a row equals the response length
  (final EOS included).
- ``attention_mask`` is ``[N, T]`` bool, True on real positions (right padding).
  :func:`causal_attention_mask` builds Megatron's ``[N, 1, T, T]`` mask (True = masked).
- ``position_ids`` count ``0..T-1`` in padded batches and restart at 0 for every sequence in
  packed batches.
- Rows are padded with the tokenizer's pad id (``CollateConfig.pad_id``) to a common length,
  rounded up to ``pad_to_multiple_of``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Self

import torch

__all__ = [
    "IGNORE_INDEX",
    "DistillationBatch",
    "KTOBatch",
    "PreferenceBatch",
    "SFTBatch",
    "causal_attention_mask",
    "split_pairs",
]

IGNORE_INDEX = -100
"""Label value of positions without a loss (prompt targets and padding)."""


class _Movable:
    """Gives a dataclass holding tensors :meth:`to`."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Self:
        """The batch with every tensor moved to ``device``."""
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = value.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class _PaddedBatch(_Movable):
    """The fields every right-padded batch starts with (see each batch for the shapes).

    Attributes:
        input_ids: ``[N, T]`` int64.
        labels: ``[N, T]`` int64, -100 on prompt targets and padding.
        attention_mask: ``[N, T]`` bool, True on real positions.
        position_ids: ``[N, T]`` int64.
        lengths: ``[N]`` real positions per row.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor

    @property
    def loss_mask(self) -> torch.Tensor:
        """``[N, T]`` float, 1 where a label exists."""
        return (self.labels != IGNORE_INDEX).float()


def causal_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Megatron's attention mask for a right-padded batch.

    Args:
        attention_mask: ``[N, T]`` bool, True on real positions.

    Returns:
        ``[N, 1, T, T]`` bool, True where query ``q`` must *not* attend key ``k``: ``k > q`` or
        ``k`` is padding.
    """
    t = attention_mask.shape[-1]
    future = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).triu(1)
    return future[None, None] | ~attention_mask.bool()[:, None, None, :]


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits a preference forward result along dim 0 into ``(chosen, rejected)`` halves."""
    if x.shape[0] % 2:
        raise ValueError(f"expected an even leading dimension, got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]


@dataclass(frozen=True)
class SFTBatch(_PaddedBatch):
    """Prompt + completion sequences (SFT, validation of SPIN).

    Attributes:
        input_ids: ``[B, T]`` int64.
        labels: ``[B, T]`` int64, -100 on prompt targets and padding.
        attention_mask: ``[B, T]`` bool, True on real positions.
        position_ids: ``[B, T]`` int64.
        lengths: ``[B]`` real positions per row.
        sample_indices: ``[B]`` dataset index of each example (-1 if unknown).
    """

    sample_indices: torch.Tensor


@dataclass(frozen=True)
class PreferenceBatch(_PaddedBatch):
    """Chosen and rejected sequences in one forward batch.

    Layout: rows ``0..B-1`` are the chosen sequences of pairs ``0..B-1`` and rows ``B..2B-1``
    their rejected sequences (``[chosen_0, ..., chosen_{B-1}, rejected_0, ..., rejected_{B-1}]``);
    :func:`split_pairs` separates any per-row result into the two halves.

    Attributes:
        input_ids: ``[2B, T]`` int64.
        labels: ``[2B, T]`` int64, -100 on prompt targets and padding.
        attention_mask: ``[2B, T]`` bool.
        position_ids: ``[2B, T]`` int64.
        lengths: ``[2B]`` real positions per row.
        chosen_rewards: ``[B]`` float32 ground-truth rewards (defaults where not given).
        rejected_rewards: ``[B]`` float32.
        rewards_given: ``[B]`` bool, True where the record had rewards.
        sample_indices: ``[B]`` dataset index of each pair.
    """

    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    rewards_given: torch.Tensor
    sample_indices: torch.Tensor

    @property
    def num_pairs(self) -> int:
        """B, the number of pairs."""
        return int(self.chosen_rewards.shape[0])


@dataclass(frozen=True)
class KTOBatch(_PaddedBatch):
    """KTO samples and their mismatched KL samples in one forward batch.

    Layout: rows ``0..B-1`` are the samples (prompt_i + completion_i); rows ``B..2B-1`` the KL
    samples, prompt_i + completion_((i+1) mod B) (the completion of the next sample in the
    micro-batch). Both halves share one padded length.

    Attributes:
        input_ids: ``[2B, T]`` int64.
        labels: ``[2B, T]`` int64, -100 on prompt targets and padding.
        attention_mask: ``[2B, T]`` bool.
        position_ids: ``[2B, T]`` int64.
        lengths: ``[2B]`` real positions per row.
        desirable: ``[B]`` bool, True for desirable samples.
        kl_completion_indices: ``[B]`` which sample's completion KL row ``B + i`` uses.
        sample_indices: ``[B]`` dataset index of each sample.
    """

    desirable: torch.Tensor
    kl_completion_indices: torch.Tensor
    sample_indices: torch.Tensor

    @property
    def num_samples(self) -> int:
        """B, the number of samples (and of KL samples)."""
        return int(self.desirable.shape[0])


@dataclass(frozen=True)
class DistillationBatch(_PaddedBatch):
    """Student inputs with the teacher's top-k logits aligned to the label positions.

    ``teacher_logits[i, t]`` / ``teacher_ids[i, t]`` are the teacher's top-k at input position
    ``t``, i.e. its prediction of ``labels[i, t]``; padding positions hold zeros.

    Attributes:
        input_ids: ``[B, T]`` int64.
        labels: ``[B, T]`` int64, -100 on prompt targets and padding.
        attention_mask: ``[B, T]`` bool.
        position_ids: ``[B, T]`` int64.
        lengths: ``[B]`` real positions per row.
        teacher_logits: ``[B, T, K]`` float32, sorted descending per position.
        teacher_ids: ``[B, T, K]`` int64.
        teacher_logsumexp: ``[B, T]`` float32, the teacher's log-sum-exp over its full
            vocabulary, in the same shift as ``teacher_logits``.
        sample_indices: ``[B]`` dataset index of each example.
    """

    teacher_logits: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_logsumexp: torch.Tensor
    sample_indices: torch.Tensor
