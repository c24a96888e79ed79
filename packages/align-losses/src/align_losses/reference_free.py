r"""Reference-free preference losses: SimPO, CPO, AlphaPO, ORPO and the SFT term.

None of these needs a reference model: they take only the policy's log-probabilities, so a
trainer using them skips the reference forward pass and holds no reference weights.

Inputs, for all of them: per-sequence **sums** of the policy's token log-probs over the response
(``sequence_logps(..., average=False)``) and the number of scored tokens of each response. Each
function forms the quantity its paper uses from these: SimPO, AlphaPO and ORPO work on the
length-normalised (average) log-prob :math:`\bar\pi = \pi/|y|`, CPO's preference term on the
sum, and the NLL terms of CPO and ORPO on the average. Token counts are clamped at 1, so an empty
response gives average 0 instead of NaN.

Returned rewards (detached, for logging and accuracy) are each method's own reward: β·π̄ (SimPO),
the α-shaped reward (AlphaPO), β·π (CPO), λ·π̄ (ORPO, as TRL logs it). Half-precision inputs are
upcast; results are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from align_losses._common import upcast
from align_losses.preference import (
    PreferenceOutput,
    _check_beta,
    _check_smoothing,
    _smoothed_sigmoid,
)

__all__ = ["alphapo_loss", "cpo_loss", "orpo_loss", "sft_loss", "simpo_loss"]


def _policy(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *lengths: Tensor,
) -> tuple[Tensor, ...]:
    chosen, rejected = upcast(policy_chosen_logps), upcast(policy_rejected_logps)
    tensors = (policy_chosen_logps, policy_rejected_logps, *lengths)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"log-probs and lengths must have one shape, got {sorted(shapes)}")
    return chosen, rejected, *(n.to(chosen.dtype).clamp(min=1.0) for n in lengths)


def _margin_loss(
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    reward: Callable[[Tensor, Tensor], Tensor],
    *,
    beta: float,
    gamma: float,
    label_smoothing: float,
) -> PreferenceOutput:
    """SimPO-shaped loss: ``-log σ(reward(π_c, |y_c|) - reward(π_r, |y_r|) - γ)``, smoothed by ε.

    ``data`` is ``(policy_chosen_logps, policy_rejected_logps, chosen_lengths,
    rejected_lengths)``.
    """
    _check_beta(beta)
    chosen, rejected, len_c, len_r = _policy(*data)
    _check_smoothing(label_smoothing)
    reward_c, reward_r = reward(chosen, len_c), reward(rejected, len_r)
    losses = _smoothed_sigmoid(reward_c - reward_r - gamma, label_smoothing)
    return PreferenceOutput(losses, reward_c.detach(), reward_r.detach())


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    r"""Simple Preference Optimisation: length-normalised rewards and a target margin, no reference.

    .. math::
        \ell = -\log\sigma\Big(\frac{\beta}{|y_c|}\pi_c - \frac{\beta}{|y_r|}\pi_r - \gamma\Big)

    (with ε > 0, the cDPO-style smoothed form
    :math:`-(1-\varepsilon)\log\sigma(x) - \varepsilon\log\sigma(-x)`). Meng et al., 2024,
    "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    https://arxiv.org/abs/2405.14734 (TRL: ``CPOTrainer(loss_type="simpo")``, whose
    ``simpo_gamma`` is γ). Defaults are the paper's β = 2, γ/β = 0.5. With equal average
    log-probs the loss is ``log(1 + e^γ)``.

    Args:
        policy_chosen_logps: ``[B]`` summed policy log-probs of the chosen responses.
        policy_rejected_logps: ``[B]`` summed policy log-probs of the rejected responses.
        chosen_lengths: ``[B]`` scored tokens of each chosen response.
        rejected_lengths: ``[B]`` scored tokens of each rejected response.
        beta: β > 0, the reward scale.
        gamma: γ, the target reward margin.
        label_smoothing: ε in ``[0, 0.5]``.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards β·π̄.
    """
    data = (policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    return _margin_loss(
        data,
        lambda logps, lengths: beta * logps / lengths,
        beta=beta,
        gamma=gamma,
        label_smoothing=label_smoothing,
    )


def alphapo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    alpha: float = 0.25,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    r"""AlphaPO: SimPO with an α-shaped reward.

    .. math::
        r(y) = \frac{\beta}{\alpha}\Big(1 - e^{-\alpha\,\pi/|y|}\Big)
             = -\frac{\beta}{\alpha}\Big(\pi(y)^{-\alpha/|y|} - 1\Big), \qquad
        \ell = -\log\sigma\big(r(y_c) - r(y_r) - \gamma\big)

    Gupta et al., 2025, "AlphaPO: Reward Shape Matters for LLM Alignment",
    https://arxiv.org/abs/2501.03884 (TRL: ``CPOTrainer`` with a non-zero ``alpha``). α = 0 is
    the limit β·π̄, i.e. :func:`simpo_loss` exactly; α > 0 makes the reward concave in π̄ (gentler
    on already-unlikely rejected responses), α < 0 convex.

    Args: as :func:`simpo_loss`, plus:
        alpha: α, the reward shape (any real; 0 is SimPO).

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and the detached rewards r(y).
    """

    def reward(logps: Tensor, lengths: Tensor) -> Tensor:
        avg = logps / lengths
        if alpha == 0:
            return beta * avg
        return -(beta / alpha) * torch.expm1(-alpha * avg)

    data = (policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    return _margin_loss(data, reward, beta=beta, gamma=gamma, label_smoothing=label_smoothing)


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    r"""Contrastive Preference Optimisation: a reference-free DPO term plus the chosen NLL.

    .. math::
        \ell = -\log\sigma\big(\beta(\pi_c - \pi_r)\big) - \lambda\,\frac{\pi_c}{|y_c|}

    Xu et al., 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation", https://arxiv.org/abs/2401.08417 (TRL:
    ``CPOTrainer(loss_type="sigmoid")``, λ = ``cpo_alpha``). The preference term uses the summed
    log-probs, the NLL term the chosen response's token-mean NLL. TRL averages the NLL over all
    chosen tokens of the batch instead of per pair; the two agree when the chosen responses have
    equal lengths. With ε > 0 the preference term is cDPO-smoothed.

    Args:
        policy_chosen_logps: ``[B]`` summed policy log-probs of the chosen responses.
        policy_rejected_logps: ``[B]`` summed policy log-probs of the rejected responses.
        chosen_lengths: ``[B]`` scored tokens of each chosen response.
        beta: β > 0.
        nll_weight: λ ≥ 0, the weight of the NLL (SFT) term; 0 drops it.
        label_smoothing: ε in ``[0, 0.5]``.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards β·π.
    """
    _check_beta(beta)
    if nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
    _check_smoothing(label_smoothing)
    chosen, rejected, len_c = _policy(policy_chosen_logps, policy_rejected_logps, chosen_lengths)
    losses = _smoothed_sigmoid(beta * (chosen - rejected), label_smoothing)
    if nll_weight:
        losses = losses - nll_weight * chosen / len_c
    return PreferenceOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def sft_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> PreferenceOutput:
    r"""The chosen response's token-mean negative log-likelihood, as a term of a combination.

    .. math:: \ell = -\pi_c / |y_c|

    The SFT term of MPO-style mixtures (TRL's ``loss_type="sft"``, which averages over all
    chosen tokens of the batch instead; equal for equal lengths). The rejected response does not
    enter the loss; the returned rewards are the two average log-probs π̄_c and π̄_r.

    Args: the log-probs and lengths as in :func:`simpo_loss`.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached average log-probs as rewards.
    """
    chosen, rejected, len_c, len_r = _policy(
        policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths
    )
    avg_c, avg_r = chosen / len_c, rejected / len_r
    return PreferenceOutput(-avg_c, avg_c.detach(), avg_r.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x``."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    odds_ratio_weight: float = 0.1,
) -> PreferenceOutput:
    r"""Odds Ratio Preference Optimisation: SFT loss plus a log-odds-ratio penalty.

    With :math:`\bar\pi = \pi/|y|` (so :math:`P = e^{\bar\pi}`) and
    :math:`\log\mathrm{odds}(y) = \bar\pi - \log(1 - e^{\bar\pi})`:

    .. math::
        \ell = -\bar\pi_c - \lambda\log\sigma\big(\log\mathrm{odds}(y_c)
               - \log\mathrm{odds}(y_r)\big)

    Hong et al., 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    https://arxiv.org/abs/2403.07691 (TRL: ``ORPOTrainer``, λ = ``beta``). The NLL is the chosen
    response's token mean (TRL averages over all chosen tokens of the batch; equal for equal
    lengths). :math:`\log(1 - e^{\bar\pi})` is computed stably; :math:`\bar\pi` is capped just
    below 0 (a response of probability 1 has infinite odds), where the gradient of the odds
    term is then 0.

    Args: the log-probs and lengths as in :func:`simpo_loss`, plus:
        odds_ratio_weight: λ ≥ 0.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards λ·π̄.
    """
    if odds_ratio_weight < 0:
        raise ValueError(f"odds_ratio_weight must be >= 0, got {odds_ratio_weight}")
    chosen, rejected, len_c, len_r = _policy(
        policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths
    )
    avg_c, avg_r = chosen / len_c, rejected / len_r
    cap = -torch.finfo(avg_c.dtype).eps
    log_c, log_r = avg_c.clamp(max=cap), avg_r.clamp(max=cap)
    log_odds = (log_c - _log1mexp(log_c)) - (log_r - _log1mexp(log_r))
    losses = -avg_c - odds_ratio_weight * F.logsigmoid(log_odds)
    lam = odds_ratio_weight
    return PreferenceOutput(losses, (lam * avg_c).detach(), (lam * avg_r).detach())
