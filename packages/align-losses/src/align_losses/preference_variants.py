r"""DPO-family variants: the other ways of turning implicit rewards into a pairwise loss.

Every function here takes the same four per-sequence log-probabilities as
:func:`align_losses.dpo_loss` (policy and frozen reference, chosen and rejected response) and
returns a :class:`~align_losses.PreferenceOutput` of per-pair losses with detached rewards
:math:`\beta(\pi - \pi^{ref})`. Notation, per pair:

.. math::
    a = \pi_c - \pi^{ref}_c, \qquad b = \pi_r - \pi^{ref}_r, \qquad \Delta = a - b,

σ the logistic function. Reference log-probs are treated as constants. Half-precision inputs are
upcast; results are float32 (float64 for float64 inputs).

Two of them look at the whole micro-batch rather than one pair: ``aot`` and ``aot_pair`` sort
over the batch dimension, so a pair's loss depends on the other pairs of the same call (under
data parallelism the sort is over this rank's pairs). ``bco_pair`` needs the running mean δ of the
rewards, which the caller keeps (:func:`bco_reward_mean`): no state is hidden in this module.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from align_losses._common import upcast
from align_losses.preference import (
    PreferenceOutput,
    _check_beta,
    _check_smoothing,
    _checked_log_ratios,
    _log_ratios,
    _output,
    _smoothed_sigmoid,
)

__all__ = [
    "RewardMean",
    "aot_loss",
    "aot_pair_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "bco_reward_mean",
    "discopop_loss",
    "exo_pair_loss",
    "hinge_loss",
    "nca_pair_loss",
    "robust_loss",
    "sigmoid_norm_loss",
    "sppo_hard_loss",
]


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    r"""Hinge loss on the implicit reward margin (SLiC-HF / RSO).

    .. math:: \ell = \max(0,\; 1 - \beta\Delta)

    Zhao et al., 2023, "SLiC-HF", https://arxiv.org/abs/2305.10425; Liu et al., 2023, "Statistical
    Rejection Sampling Improves Preference Optimization" (RSO), https://arxiv.org/abs/2309.06657.
    1/β is the margin. At policy = reference the loss is 1.

    Args: the log-probs and ``beta`` (β > 0) as in :func:`~align_losses.dpo_loss`.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    chosen, rejected = _checked_log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.relu(1.0 - beta * (chosen - rejected))
    return _output(losses, chosen, rejected, beta)


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    r"""Robust DPO (rDPO): an unbiased DPO loss under preference labels flipped with rate ε.

    .. math::
        \ell = \frac{-(1-\varepsilon)\log\sigma(\beta\Delta)
                     + \varepsilon\log\sigma(-\beta\Delta)}{1 - 2\varepsilon}

    Chowdhury et al., 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    https://arxiv.org/abs/2403.00409. How it differs from cDPO (``dpo_loss(label_smoothing=ε)``):
    cDPO *adds* the flipped-label loss, ``−(1−ε)log σ(βΔ) − ε log σ(−βΔ)``, a
    cross-entropy against soft targets whose minimiser is a finite margin; rDPO *subtracts* it and
    rescales by 1/(1−2ε), which makes the expected loss over noisy labels equal the clean DPO loss
    (an unbiased estimate), so the margin keeps being pushed up. At Δ = 0 the loss is ln 2 for
    every ε; the gradient with respect to βΔ there is −1/(2(1−2ε)) (cDPO's: −(1−2ε)/2). ε = 0 is
    plain DPO.

    Args: as :func:`~align_losses.dpo_loss`, except
        label_smoothing: ε in ``[0, 0.5)``, the assumed label-flip rate.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing, closed=False)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing:
        losses = (losses + label_smoothing * F.logsigmoid(-logits)) / (1.0 - 2.0 * label_smoothing)
    return _output(losses, chosen, rejected, beta)


def exo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> PreferenceOutput:
    r"""Pairwise EXO: the reverse KL from the model's preference to the smoothed label.

    With :math:`p = \sigma(\beta\Delta)` the model's probability that the chosen response wins and
    the target :math:`(1-\varepsilon, \varepsilon)`:

    .. math::
        \ell = \mathrm{KL}\big(\mathrm{Bern}(p)\,\|\,\mathrm{Bern}(1-\varepsilon)\big)
             = \sigma(\beta\Delta)\big[\log\sigma(\beta\Delta) - \log(1-\varepsilon)\big]
             + \sigma(-\beta\Delta)\big[\log\sigma(-\beta\Delta) - \log\varepsilon\big]

    Ji et al., 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    https://arxiv.org/abs/2402.00856 (the K = 2 case). ε must be positive (ε = 0 makes the target
    degenerate); TRL's default is 10⁻³. At Δ = 0 the loss is −ln 2 − ½ ln(ε(1−ε)).

    Args: as :func:`~align_losses.dpo_loss`, except
        label_smoothing: ε in ``(0, 0.5]`` (positive).

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    _check_beta(beta)
    if not 0.0 < label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in (0, 0.5] for exo_pair, got {label_smoothing}")
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen - rejected)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = log_p.exp() * (log_p - math.log1p(-label_smoothing)) + log_not_p.exp() * (
        log_not_p - math.log(label_smoothing)
    )
    return _output(losses, chosen, rejected, beta)


def nca_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    r"""Pairwise Noise Contrastive Alignment: absolute, not relative, likelihood targets.

    .. math::
        \ell = -\log\sigma(\beta a) - \tfrac12\log\sigma(-\beta a) - \tfrac12\log\sigma(-\beta b)

    Chen et al., 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    https://arxiv.org/abs/2402.05369. At policy = reference the loss is 2 ln 2.

    Args: the log-probs and ``beta`` (β > 0) as in :func:`~align_losses.dpo_loss`.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    chosen, rejected = _checked_log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    rc, rr = beta * chosen, beta * rejected
    losses = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    return _output(losses, chosen, rejected, beta)


class RewardMean(NamedTuple):
    """Running mean of implicit rewards (the state of ``bco_pair``), kept by the caller.

    Attributes:
        mean: ``[]`` mean of every reward seen so far (0 before the first update).
        count: ``[]`` how many rewards that mean is over (float, so it can be checkpointed and
            all-reduced like any other tensor).
    """

    mean: Tensor
    count: Tensor


def bco_reward_mean(
    state: RewardMean | None,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
) -> RewardMean:
    r"""Fold a batch of rewards into the running reward mean δ of ``bco_pair``.

    δ is the mean of all chosen and rejected implicit rewards :math:`\beta(\pi - \pi^{ref})` seen
    so far, this batch included (BCO's reward shift). With ``group`` the batch is the union over
    all ranks (one all-reduce of two numbers), so every rank holds the same δ. TRL instead keeps
    the mean of per-step batch means; the two agree when every step has the same number of pairs.

    Args:
        state: the previous state, or None before the first batch.
        chosen_rewards: ``[B]`` rewards of the chosen responses (detached inside).
        rejected_rewards: ``[B]`` rewards of the rejected responses.
        group: data-parallel process group, or None.

    Returns:
        The updated :class:`RewardMean`; pass ``state.mean`` to :func:`bco_pair_loss`.
    """
    rewards = torch.cat([upcast(chosen_rewards).detach(), upcast(rejected_rewards).detach()])
    stats = torch.stack([rewards.sum(), rewards.new_tensor(float(rewards.numel()))])
    if group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    if state is None:
        state = RewardMean(stats.new_zeros(()), stats.new_zeros(()))
    count = state.count.to(stats) + stats[1]
    mean = (state.mean.to(stats) * state.count.to(stats) + stats[0]) / count.clamp(min=1.0)
    return RewardMean(mean, count)


def bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    reward_mean: Tensor | float = 0.0,
) -> PreferenceOutput:
    r"""Binary Classifier Optimisation on pairs: chosen → 1, rejected → 0, rewards shifted by δ.

    .. math::
        \ell = -\log\sigma(\beta a - \delta) - \log\sigma(-(\beta b - \delta))

    Jung et al., 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    https://arxiv.org/abs/2404.04656. δ is the running mean of the rewards, treated as a constant;
    update it with :func:`bco_reward_mean` *before* calling this (TRL's order: the current batch
    is part of δ). At policy = reference and δ = 0 the loss is 2 ln 2.

    Args: the log-probs and ``beta`` (β > 0) as in :func:`~align_losses.dpo_loss`, plus:
        reward_mean: δ, a scalar (``RewardMean.mean``), detached.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    chosen, rejected = _checked_log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    delta = torch.as_tensor(reward_mean, dtype=chosen.dtype, device=chosen.device).detach()
    losses = -F.logsigmoid(beta * chosen - delta) - F.logsigmoid(-(beta * rejected - delta))
    return _output(losses, chosen, rejected, beta)


def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    r"""Self-Play Preference Optimisation with hard win probabilities (1 for chosen, 0 rejected).

    .. math:: \ell = \Big(a - \frac{1}{2\beta}\Big)^2 + \Big(b + \frac{1}{2\beta}\Big)^2

    Wu et al., 2024, "Self-Play Preference Optimization for Language Model Alignment",
    https://arxiv.org/abs/2405.00675 (the squared loss with P(y ≻ π) replaced by the hard label,
    as TRL's ``sppo_hard``). At policy = reference the loss is 1/(2β²).

    Args: the log-probs and ``beta`` (β > 0) as in :func:`~align_losses.dpo_loss`.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    chosen, rejected = _checked_log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    target = 1.0 / (2.0 * beta)
    losses = (chosen - target) ** 2 + (rejected + target) ** 2
    return _output(losses, chosen, rejected, beta)


def _transport_loss(
    logps: tuple[Tensor, Tensor, Tensor, Tensor],
    beta: float,
    label_smoothing: float,
    *,
    paired: bool,
) -> PreferenceOutput:
    """Smoothed DPO loss on batch-sorted quantiles: of the margins (paired) or the log-ratios."""
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    chosen, rejected = _log_ratios(*logps)
    if paired:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected = map(upcast, logps)
        first, second = policy_chosen - policy_rejected, (ref_chosen - ref_rejected).detach()
    else:
        first, second = chosen, rejected
    sorted_delta = torch.sort(first, dim=0).values - torch.sort(second, dim=0).values
    losses = _smoothed_sigmoid(beta * sorted_delta, label_smoothing)
    return _output(losses, chosen, rejected, beta)


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    r"""Alignment via Optimal Transport, paired: stochastic dominance of the policy's margins.

    The policy's log-likelihood margins :math:`m_i = \pi_{c,i} - \pi_{r,i}` and the reference's
    :math:`m^{ref}_i` are each sorted over the batch, and the DPO loss is applied to the sorted
    quantiles: with :math:`d_{(i)} = m_{(i)} - m^{ref}_{(i)}`,

    .. math::
        \ell_i = -(1-\varepsilon)\log\sigma(\beta d_{(i)}) - \varepsilon\log\sigma(-\beta d_{(i)})

    Melnyk et al., 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    https://arxiv.org/abs/2406.05882 (TRL's ``aot``). ``losses[i]`` belongs to the i-th quantile,
    not to pair i; the mean over the batch is what is meaningful, and it depends on the whole
    batch (larger batches approximate the distributions better). Rewards are per pair, as usual.

    Args: as :func:`~align_losses.dpo_loss`.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` quantile losses and detached per-pair rewards.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _transport_loss(logps, beta, label_smoothing, paired=True)


def aot_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    r"""Alignment via Optimal Transport on the log-ratios of chosen and rejected separately.

    The chosen log-ratios :math:`a_i` and the rejected ones :math:`b_i` are each sorted over the
    batch and paired by quantile: with :math:`d_{(i)} = a_{(i)} - b_{(i)}`,

    .. math::
        \ell_i = -(1-\varepsilon)\log\sigma(\beta d_{(i)}) - \varepsilon\log\sigma(-\beta d_{(i)})

    Melnyk et al., 2024, https://arxiv.org/abs/2406.05882 (TRL's ``aot_pair``, later renamed
    ``aot_unpaired``: the pairing of the data is not used). As for :func:`aot_loss`, the losses are
    per quantile and depend on the whole batch.

    Args: as :func:`~align_losses.dpo_loss`.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` quantile losses and detached per-pair rewards.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _transport_loss(logps, beta, label_smoothing, paired=False)


def apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    r"""Anchored Preference Optimisation, APO-zero: raise the chosen, lower the rejected.

    .. math:: \ell = \big(1 - \sigma(\beta a)\big) + \sigma(\beta b)

    D'Oosterlinck et al., 2024, "Anchored Preference Optimization and Contrastive Revisions",
    https://arxiv.org/abs/2408.06266. For when the chosen responses are better than the model's
    own. At policy = reference the loss is 1.

    Args: the log-probs and ``beta`` (β > 0) as in :func:`~align_losses.dpo_loss`.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    chosen, rejected = _checked_log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.sigmoid(-beta * chosen) + torch.sigmoid(beta * rejected)
    return _output(losses, chosen, rejected, beta)


def apo_down_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    r"""Anchored Preference Optimisation, APO-down: lower both, the rejected more.

    .. math:: \ell = \sigma(\beta a) + \big(1 - \sigma(\beta\Delta)\big)

    D'Oosterlinck et al., 2024, https://arxiv.org/abs/2408.06266. For when the model's own
    responses are already better than the chosen ones. At policy = reference the loss is 1.

    Args: the log-probs and ``beta`` (β > 0) as in :func:`~align_losses.dpo_loss`.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    chosen, rejected = _checked_log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.sigmoid(beta * chosen) + torch.sigmoid(-beta * (chosen - rejected))
    return _output(losses, chosen, rejected, beta)


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
) -> PreferenceOutput:
    r"""DiscoPOP: a log-ratio-modulated blend of the logistic and the exponential loss.

    With :math:`x = \beta\Delta` and :math:`m = \sigma(x/\tau)`:

    .. math:: \ell = -(1 - m)\log\sigma(x) + m\,e^{-x}

    Chris Lu et al., 2024, "Discovering Preference Optimization Algorithms with and for Large
    Language Models", https://arxiv.org/abs/2406.08414, Eq. 5. The exponential term is computed
    as :math:`\exp(\log\sigma(x/\tau) - x)`, finite wherever the loss is. At policy = reference
    the loss is (1 + ln 2)/2.

    Args: the log-probs and ``beta`` (β > 0) as in :func:`~align_losses.dpo_loss`, plus:
        discopop_tau: τ > 0, the temperature of the modulation (the paper's 0.05).

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    _check_beta(beta)
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be positive, got {discopop_tau}")
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    x = beta * (chosen - rejected)
    logistic = -F.logsigmoid(x) * torch.sigmoid(-x / discopop_tau)
    exponential = torch.exp(F.logsigmoid(x / discopop_tau) - x)
    return _output(logistic + exponential, chosen, rejected, beta)


def _check_lengths(lengths: Tensor, like: Tensor, name: str) -> Tensor:
    if lengths.shape != like.shape:
        raise ValueError(f"{name} must have the shape of the log-probs, got {tuple(lengths.shape)}")
    return lengths.to(like.dtype).clamp(min=1.0)


def sigmoid_norm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    r"""Length-normalised DPO: the DPO loss on log-ratios divided by the response lengths.

    .. math:: \ell = -\log\sigma\Big(\beta\Big(\frac{a}{|y_c|} - \frac{b}{|y_r|}\Big)\Big)

    Lambert et al., 2024, "Tülu 3", https://arxiv.org/abs/2411.15124 (length-normalised DPO;
    TRL's ``sigmoid_norm``). Takes per-sequence *sums* and token counts (clamped at 1); equal to
    ``dpo_loss`` on ``sequence_logps(..., average=True)`` of policy and reference. At policy =
    reference the loss is ln 2. Rewards are the usual unnormalised β·(π − π_ref).

    Args: the summed log-probs and ``beta`` (β > 0) as in :func:`~align_losses.dpo_loss`, plus:
        chosen_lengths: ``[B]`` scored tokens of each chosen response.
        rejected_lengths: ``[B]`` scored tokens of each rejected response.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.
    """
    chosen, rejected = _checked_log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    len_c = _check_lengths(chosen_lengths, chosen, "chosen_lengths")
    len_r = _check_lengths(rejected_lengths, chosen, "rejected_lengths")
    losses = -F.logsigmoid(beta * (chosen / len_c - rejected / len_r))
    return _output(losses, chosen, rejected, beta)
