"""Top-k, log-sum-exp and argmax of vocabulary-parallel logits (no gradient).

Each tensor-parallel rank holds the logits of a contiguous slice of the vocabulary. The top-k of
the whole vocabulary is the top-k of the union of every rank's local top-k, so each rank takes
its own top-k, the ``[..., k]`` values and global ids are all-gathered over the group, and the
top-k of the ``[..., k·TP]`` candidates is taken: ``k·TP`` numbers per position travel instead of
the vocabulary. The full-vocabulary log-sum-exp needs one more all-reduce (a sum of exponentials
under the global maximum, which is the merged top-1).

Entries at or above the real vocabulary size (megatron's padding) are left out of both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["TopK", "vocab_parallel_argmax", "vocab_parallel_topk"]


class TopK(NamedTuple):
    """The teacher's top-k at each position.

    Attributes:
        logits: ``[..., k]`` float32 logits minus the row's maximum (NeMo-Aligner's convention:
            the first column is 0), sorted descending.
        ids: ``[..., k]`` int64 global vocabulary ids of ``logits``.
        logsumexp: ``[...]`` float32 log-sum-exp of the full (real) vocabulary's logits minus
            the same maximum, so ``logits - logsumexp`` are log-probabilities.
    """

    logits: Tensor
    ids: Tensor
    logsumexp: Tensor


def _all_gather_last(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _real_columns(vocab_local: int, vocab_start: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        return vocab_local
    return min(max(vocab_size - vocab_start, 0), vocab_local)


@torch.no_grad()
def vocab_parallel_topk(
    logits: Tensor,
    k: int,
    *,
    group: dist.ProcessGroup | None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> TopK:
    """The top-k of the full vocabulary from this rank's vocabulary slice.

    Args:
        logits: ``[..., V_local]`` this rank's slice ``[vocab_start, vocab_start + V_local)``.
        k: Tokens per position (at most the real vocabulary size).
        group: The tensor-parallel group the vocabulary is split over; None (or a group of one)
            for unsplit logits.
        vocab_start: First global id of this rank's slice.
        vocab_size: Real vocabulary size; ids at or above it are ignored. None keeps all.

    Returns:
        The `TopK` (identical on every rank of ``group``).

    Raises:
        ValueError: When ``k`` exceeds the vocabulary.
    """
    sharded = group is not None and group.size() > 1
    vocab_local = logits.shape[-1]
    total = (
        vocab_size
        if vocab_size is not None
        else vocab_local * (group.size() if group is not None and sharded else 1)
    )
    if not 1 <= k <= total:
        raise ValueError(f"top_k={k} must be in [1, vocabulary size {total}]")
    x = logits.detach().float()
    real = _real_columns(vocab_local, vocab_start, vocab_size)
    if real < vocab_local:
        x = x.clone()
        x[..., real:] = float("-inf")
    local_k = min(k, vocab_local)
    values, ids = torch.topk(x, local_k, dim=-1)
    ids = ids + vocab_start
    if sharded:
        assert group is not None
        if local_k < k:
            pad = k - local_k
            values = torch.nn.functional.pad(values, (0, pad), value=float("-inf"))
            ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
        values = _all_gather_last(values, group)
        ids = _all_gather_last(ids, group)
        values, best = torch.topk(values, k, dim=-1)
        ids = ids.gather(-1, best)
    top = values[..., :1]
    sum_exp = torch.exp(x - top).sum(dim=-1)
    if sharded:
        dist.all_reduce(sum_exp, group=group)
    return TopK(values - top, ids.long(), torch.log(sum_exp))


@torch.no_grad()
def vocab_parallel_argmax(
    logits: Tensor,
    *,
    group: dist.ProcessGroup | None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> Tensor:
    """Global id of the largest real logit at each position (``[...]`` int64).

    Args:
        logits: ``[..., V_local]`` this rank's vocabulary slice.
        group: The tensor-parallel group, or None for unsplit logits.
        vocab_start: First global id of this rank's slice.
        vocab_size: Real vocabulary size; ids at or above it are ignored.

    Returns:
        The ids, identical on every rank of ``group`` (ties go to the lowest id).
    """
    x = logits.detach()
    real = _real_columns(x.shape[-1], vocab_start, vocab_size)
    if real < x.shape[-1]:
        x = x.clone()
        x[..., real:] = float("-inf")
    values, ids = x.max(dim=-1, keepdim=True)
    ids = ids + vocab_start
    if group is not None and group.size() > 1:
        values = _all_gather_last(values.float(), group)
        ids = _all_gather_last(ids, group)
        ids = ids.gather(-1, values.argmax(dim=-1, keepdim=True))
    return ids[..., 0].long()
