r"""Pairwise preference losses: DPO (and cDPO), IPO, reward-aware RPO and SPIN.

The other DPO-family variants live in :mod:`align_losses.preference_variants` (f-DPO in
:mod:`align_losses.fdpo`), the reference-free objectives in :mod:`align_losses.reference_free`, and
:func:`align_losses.preference_loss` selects and combines any of them by name.

All functions take per-sequence log-probabilities (see :func:`align_losses.sequence_logps`) of the
policy and of the frozen reference for the chosen and the rejected response of each pair, and
return per-pair losses without any reduction. With

.. math:: \Delta = (\pi_c - \pi^{ref}_c) - (\pi_r - \pi^{ref}_r)

the implicit rewards returned alongside are :math:`\beta(\pi_c - \pi^{ref}_c)` and
:math:`\beta(\pi_r - \pi^{ref}_r)` (the DPO paper's implicit reward), detached from the graph:
they are for logging and accuracy metrics.

Dtypes: half-precision inputs are upcast; results are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch.nn.functional as F
from torch import Tensor

from align_losses._common import upcast

__all__ = ["PreferenceOutput", "dpo_loss", "ipo_loss", "rpo_loss", "spin_loss"]

RPODivergence = Literal["sq", "bwd_kl", "fwd_kl"]


class PreferenceOutput(NamedTuple):
    """Per-pair outputs of a preference loss.

    Attributes:
        losses: ``[B]`` per-pair loss; reduce it (mean, or sum over a global normaliser) yourself.
        chosen_rewards: ``[B]`` detached ``β·(π_c − π^ref_c)``.
        rejected_rewards: ``[B]`` detached ``β·(π_r − π^ref_r)``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")


def _check_smoothing(label_smoothing: float, *, upper: float = 0.5, closed: bool = True) -> None:
    inside = label_smoothing <= upper if closed else label_smoothing < upper
    if not (label_smoothing >= 0.0 and inside):
        bracket = "]" if closed else ")"
        raise ValueError(f"label_smoothing must be in [0, {upper}{bracket}, got {label_smoothing}")


def _log_ratios(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    shapes = {
        tuple(t.shape)
        for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    }
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape, got {sorted(shapes)}")
    chosen = upcast(policy_chosen_logps) - upcast(ref_chosen_logps).detach()
    rejected = upcast(policy_rejected_logps) - upcast(ref_rejected_logps).detach()
    return chosen, rejected


def _checked_log_ratios(
    beta: float,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`_log_ratios` after checking β (for losses with no other argument to check)."""
    _check_beta(beta)
    return _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """``−(1−ε) log σ(x) − ε log σ(−x)``; exactly ``−log σ(x)`` for ε = 0."""
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def _output(losses: Tensor, chosen: Tensor, rejected: Tensor, beta: float) -> PreferenceOutput:
    return PreferenceOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    r"""Direct Preference Optimization loss, with conservative label smoothing (cDPO).

    .. math::
        \ell = -(1 - \varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)

    DPO: Rafailov et al., 2023, https://arxiv.org/abs/2305.18290. cDPO (ε = probability that a
    preference label is flipped): Mitchell, 2023, https://ericmitchell.ai/cdpo.pdf. At
    policy = reference (Δ = 0) the loss is ln 2 for every β and ε.

    Args:
        policy_chosen_logps: ``[B]`` policy log-probs of the chosen responses.
        policy_rejected_logps: ``[B]`` policy log-probs of the rejected responses.
        ref_chosen_logps: ``[B]`` reference log-probs of the chosen responses (no gradient).
        ref_rejected_logps: ``[B]`` reference log-probs of the rejected responses (no gradient).
        beta: inverse temperature β > 0 (strength of the implicit KL penalty).
        label_smoothing: ε in ``[0, 0.5]``; 0 is plain DPO.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.

    Raises:
        ValueError: for β ≤ 0, ε outside ``[0, 0.5]`` or mismatched shapes.
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = _smoothed_sigmoid(beta * (chosen - rejected), label_smoothing)
    return _output(losses, chosen, rejected, beta)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    r"""Identity Preference Optimisation loss.

    .. math:: \ell = \left(\Delta - \frac{1}{2\beta}\right)^2

    Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", https://arxiv.org/abs/2310.12036 (β plays the role of the paper's τ). At
    Δ = 0 the loss is 1/(4β²).

    Length convention: this function does not normalise; Δ is formed from exactly the log-probs
    it is given. The convention this package documents and tests for IPO is the token mean,
    ``sequence_logps(..., average=True)`` of policy and reference (TRL's ``loss_type="ipo"``
    averages the same way): the target margin 1/(2β) is then per token, independent of response
    length, and the loss is unchanged by padding (ignored labels count in neither the sum nor
    the token count). Summed log-probs (NeMo-Aligner's default,
    ``preference_average_log_probs=False``) make the same margin a per-sequence one.

    Args: the log-probs and ``beta`` (β > 0) as in :func:`dpo_loss`; the target margin is 1/(2β).

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.

    Raises:
        ValueError: for β ≤ 0 or mismatched shapes.
    """
    chosen, rejected = _checked_log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return _output(losses, chosen, rejected, beta)


def _bernoulli_kl(log_p: Tensor, log_not_p: Tensor, log_q: Tensor, log_not_q: Tensor) -> Tensor:
    """KL(Bern(p) ‖ Bern(q)) from the four log-probabilities."""
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


def rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_gt_rewards: Tensor,
    rejected_gt_rewards: Tensor,
    *,
    beta: float = 0.1,
    gt_reward_scale: float = 1.0,
    divergence: RPODivergence = "bwd_kl",
) -> PreferenceOutput:
    r"""Reward-aware Preference Optimization (RPO) loss.

    The implicit reward gap βΔ is fitted to the scaled ground-truth reward gap
    :math:`\Delta^* = \eta\,(R_c - R_r)` (η = ``gt_reward_scale``):

    .. math::
        \text{sq:}\quad \ell = (\beta\Delta - \Delta^*)^2 \\
        \text{bwd\_kl:}\quad \ell = \mathrm{KL}\big(\mathrm{Bern}(\sigma(\Delta^*))
            \,\|\, \mathrm{Bern}(\sigma(\beta\Delta))\big) \\
        \text{fwd\_kl:}\quad \ell = \mathrm{KL}\big(\mathrm{Bern}(\sigma(\beta\Delta))
            \,\|\, \mathrm{Bern}(\sigma(\Delta^*))\big)

    with :math:`\mathrm{KL}(\mathrm{Bern}(a)\|\mathrm{Bern}(b)) = a\log\frac{a}{b} +
    (1-a)\log\frac{1-a}{1-b}`, computed from ``logsigmoid`` terms. Nemotron-4 340B technical
    report, Section 3.4.3, https://arxiv.org/abs/2406.11704. Not to be confused with TRL's former
    ``rpo_alpha`` (DPO plus an NLL term), which is ``dpo_loss`` plus ``-sequence_logps``.

    Args: the log-probs and ``beta`` (β > 0) as in :func:`dpo_loss`, plus:
        chosen_gt_rewards: ``[B]`` ground-truth rewards R_c of the chosen responses.
        rejected_gt_rewards: ``[B]`` ground-truth rewards R_r of the rejected responses.
        gt_reward_scale: η, the scale applied to the ground-truth reward gap.
        divergence: ``"sq"``, ``"bwd_kl"`` (target distribution first) or ``"fwd_kl"``.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards.

    Raises:
        ValueError: for β ≤ 0, an unknown divergence or mismatched shapes.
    """
    _check_beta(beta)
    if divergence not in ("sq", "bwd_kl", "fwd_kl"):
        raise ValueError(f"divergence must be 'sq', 'bwd_kl' or 'fwd_kl', got {divergence!r}")
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if chosen_gt_rewards.shape != chosen.shape or rejected_gt_rewards.shape != chosen.shape:
        raise ValueError("ground-truth rewards must have the shape of the log-probs")
    logits = beta * (chosen - rejected)
    target = gt_reward_scale * (upcast(chosen_gt_rewards) - upcast(rejected_gt_rewards)).detach()
    if divergence == "sq":
        losses = (logits - target) ** 2
    else:
        model = (F.logsigmoid(logits), F.logsigmoid(-logits))
        truth = (F.logsigmoid(target), F.logsigmoid(-target))
        if divergence == "bwd_kl":
            losses = _bernoulli_kl(*truth, *model)
        else:
            losses = _bernoulli_kl(*model, *truth)
    return _output(losses, chosen, rejected, beta)


def spin_loss(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    ref_real_logps: Tensor,
    ref_generated_logps: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    r"""Self-Play fIne-tuNing (SPIN) loss: DPO with the real response as the chosen one.

    .. math:: \ell = -\log\sigma\Big(\beta\big[(\pi_{real} - \pi^{ref}_{real})
                    - (\pi_{gen} - \pi^{ref}_{gen})\big]\Big)

    where the generated response was sampled from the reference (the previous iteration's
    policy). Chen et al., 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong
    Language Models", https://arxiv.org/abs/2401.01335 (logistic loss variant).

    Args:
        policy_real_logps: ``[B]`` policy log-probs of the ground-truth responses.
        policy_generated_logps: ``[B]`` policy log-probs of the generated responses.
        ref_real_logps: ``[B]`` reference log-probs of the ground-truth responses.
        ref_generated_logps: ``[B]`` reference log-probs of the generated responses.
        beta: β > 0.

    Returns:
        :class:`PreferenceOutput`; ``chosen_rewards`` are the real responses', ``rejected_rewards``
        the generated ones'.

    Raises:
        ValueError: for β ≤ 0 or mismatched shapes.
    """
    return dpo_loss(
        policy_real_logps,
        policy_generated_logps,
        ref_real_logps,
        ref_generated_logps,
        beta=beta,
        label_smoothing=0.0,
    )
