"""Kahneman-Tversky Optimization (KTO) loss with a group-aware KL baseline."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from align_losses._common import upcast
from align_losses._vocab_parallel import ProcessGroup, all_reduce

__all__ = ["KTOOutput", "kto_loss"]


class KTOOutput(NamedTuple):
    """Per-example outputs of :func:`kto_loss`.

    Attributes:
        losses: ``[B]`` per-example loss, weight included; reduce it yourself.
        rewards: ``[B]`` detached ``β·(π − π^ref)``.
        kl: scalar, detached: the baseline z₀ that was used (after the clamp at 0).
    """

    losses: Tensor
    rewards: Tensor
    kl: Tensor


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    group: ProcessGroup | None = None,
) -> KTOOutput:
    r"""Kahneman-Tversky Optimization loss for unpaired desirable / undesirable examples.

    With :math:`r = \pi - \pi^{ref}` per example and the reference point

    .. math:: z_0 = \max\Big(0,\ \tfrac{1}{M}\sum_{j=1}^{M} (\pi^{KL}_j - \pi^{ref,KL}_j)\Big)

    taken over the *whole* KL batch (the mismatched prompt/response pairs of every rank of
    ``group``) and detached, the per-example loss is

    .. math::
        \ell = \begin{cases}
            w_D\,\big(1 - \sigma(\beta(r - z_0))\big) & \text{desirable} \\
            w_U\,\big(1 - \sigma(\beta(z_0 - r))\big) & \text{undesirable}
        \end{cases}

    Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    https://arxiv.org/abs/2402.01306. At r = z₀ = 0 each loss is 0.5·w.

    The baseline is averaged over all ranks *before* the clamp (NeMo-Aligner clamps each
    micro-batch first, then averages): one all-reduce of a two-element tensor (sum, count), so
    ranks may hold different numbers of KL samples. A KL batch that is empty everywhere gives
    z₀ = 0. No gradient flows into ``policy_kl_logps``.

    Args:
        policy_logps: ``[B]`` policy log-probs of the examples.
        ref_logps: ``[B]`` reference log-probs of the examples (no gradient).
        desirable: ``[B]`` bool, True for desirable examples; either group may be empty.
        policy_kl_logps: ``[M]`` policy log-probs of this rank's KL (mismatched) samples.
        ref_kl_logps: ``[M]`` reference log-probs of the same KL samples.
        beta: β > 0.
        desirable_weight: w_D ≥ 0.
        undesirable_weight: w_U ≥ 0.
        group: process group whose ranks' KL samples form the batch (data parallel), or None.

    Returns:
        :class:`KTOOutput`; results are float32 (float64 for float64 inputs).

    Raises:
        ValueError: for β ≤ 0, negative weights or mismatched shapes.
        TypeError: if ``desirable`` is not a bool tensor.
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("desirable_weight and undesirable_weight must be non-negative")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    if not (policy_logps.shape == ref_logps.shape == desirable.shape):
        raise ValueError("policy_logps, ref_logps and desirable must have one shape")
    if policy_kl_logps.shape != ref_kl_logps.shape:
        raise ValueError("policy_kl_logps and ref_kl_logps must have one shape")

    rewards = upcast(policy_logps) - upcast(ref_logps).detach()
    with torch.no_grad():
        kl_ratios = upcast(policy_kl_logps) - upcast(ref_kl_logps)
        count = torch.full(
            (), float(kl_ratios.numel()), dtype=kl_ratios.dtype, device=kl_ratios.device
        )
        stats = all_reduce(torch.stack([kl_ratios.sum(), count]), dist.ReduceOp.SUM, group)
        z0 = (stats[0] / stats[1].clamp(min=1)).clamp(min=0).to(rewards.dtype)

    desirable_losses = desirable_weight * torch.sigmoid(-beta * (rewards - z0))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z0 - rewards))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return KTOOutput(losses, (beta * rewards).detach(), z0)
