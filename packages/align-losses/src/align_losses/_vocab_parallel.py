"""Collectives for vocabulary-parallel logits (logits sharded over the last dimension).

Every rank of ``group`` holds a contiguous slice ``[vocab_start, vocab_start + V_local)`` of the
vocabulary. The helpers here combine per-rank partial results so that the value equals the one
an unsharded computation would produce (Megatron-LM's vocab-parallel cross entropy,
https://arxiv.org/abs/1909.08053). With ``group=None`` every helper is the identity, so the same
code path serves unsharded calls.

All collectives are issued on tensors already on the logits' device; none of them waits on the
host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


def all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType, group: ProcessGroup | None) -> Tensor:
    """All-reduce ``x`` in place over ``group`` and return it (identity when ``group`` is None)."""
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def combine_logsumexp(
    shift: Tensor, log_sum: Tensor, group: ProcessGroup | None
) -> tuple[Tensor, Tensor]:
    """Combine per-rank log-sum-exps into the log-sum-exp over the whole vocabulary.

    Each rank's log-sum-exp over its slice is ``shift + log_sum``, with ``shift`` the row max
    and ``log_sum = log Σ exp(z − shift)``: keeping the two apart, and subtracting the shift from
    a logit before the log-sum, keeps ``z − lse`` as accurate as ``log_softmax`` at large logits.
    With ``m = max_r shift_r`` (all-reduce max) and
    ``s = Σ_r exp((shift_r − m) + log_sum_r)`` (all-reduce sum) the global one is
    ``m + log s``, again returned as the pair ``(m, log s)``.

    Args:
        shift: this rank's per-row shift, any shape.
        log_sum: this rank's per-row log-sum of shifted exponentials, same shape.
        group: the process group the vocabulary is sharded over, or None (identity).

    Returns:
        The global ``(shift, log_sum)``; rows whose every logit is ``−inf`` get ``log_sum = −inf``.
    """
    if group is None:
        return shift, log_sum
    reported = torch.where(torch.isneginf(log_sum), torch.full_like(shift, float("-inf")), shift)
    top = all_reduce(reported, dist.ReduceOp.MAX, group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = all_reduce(torch.exp((shift - top) + log_sum), dist.ReduceOp.SUM, group)
    return top, torch.log(total)


def owned_columns(ids: Tensor, vocab_start: int, vocab_local: int) -> tuple[Tensor, Tensor]:
    """Map global vocabulary ids to this rank's columns.

    Args:
        ids: integer tensor of global vocabulary ids.
        vocab_start: first global id held by this rank.
        vocab_local: number of ids held by this rank.

    Returns:
        ``(columns, owned)``: local column indices (clamped into range where not owned, so they can
        be used with ``gather``) and a bool mask of the ids this rank holds.
    """
    local = ids.long() - vocab_start
    owned = (local >= 0) & (local < vocab_local)
    columns = local.clamp(0, max(vocab_local - 1, 0))
    return columns, owned


def gather_owned(x: Tensor, columns: Tensor, owned: Tensor, group: ProcessGroup | None) -> Tensor:
    """Gather ``x[..., columns]`` where this rank owns the id, then sum over ``group``.

    Since exactly one rank owns each id, the all-reduced sum is the value at the global id.

    Args:
        x: this rank's ``[..., V_local]`` slice.
        columns: local column indices ``[..., K]`` from :func:`owned_columns`.
        owned: the matching ownership mask.
        group: the process group, or None.

    Returns:
        ``[..., K]`` values in ``x``'s dtype.
    """
    values = x.gather(-1, columns)
    values = torch.where(owned, values, torch.zeros_like(values))
    return all_reduce(values, dist.ReduceOp.SUM, group)


def all_gather_cat(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Concatenate ``x`` from every rank of ``group`` along the last dimension, in rank order."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
