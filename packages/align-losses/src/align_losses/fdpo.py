r"""f-DPO: DPO with the reverse-KL regulariser replaced by another f-divergence.

Wang et al., 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints", https://arxiv.org/abs/2309.16240. Same inputs and outputs as
:func:`align_losses.dpo_loss`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from align_losses.preference import (
    PreferenceOutput,
    _check_beta,
    _check_smoothing,
    _log_ratios,
    _output,
    _smoothed_sigmoid,
)

__all__ = ["FDivergence", "fdpo_loss"]

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


def _capped_exp(x: Tensor) -> Tensor:
    """``exp(x)`` with ``x`` capped at ``log(finfo.max)`` so that it never overflows to inf."""
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max)))


def fdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    divergence: FDivergence = "reverse_kl",
    divergence_alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    r"""f-DPO: DPO with the reverse-KL regulariser replaced by another f-divergence.

    The implicit reward becomes :math:`\beta f'(u)` with :math:`u = \pi/\pi^{ref}` the likelihood
    ratio (:math:`\log u = a` or :math:`b`), and the loss is the (cDPO-smoothed) logistic loss on
    :math:`x = \beta\,(f'(u_c) - f'(u_r))`:

    .. math::
        \text{reverse\_kl } (f = u\log u):\quad & x = \beta(a - b) \quad\text{(DPO)} \\
        \text{forward\_kl } (f = -\log u):\quad & x = \beta(e^{-b} - e^{-a}) \\
        \text{js\_divergence}:\quad & x = \beta\big[(a - b)
            - (\log(1 + e^{a}) - \log(1 + e^{b}))\big] \\
        \alpha\text{-divergence}:\quad & x = \frac{\beta}{\alpha}\,(e^{-\alpha b} - e^{-\alpha a})

    and :math:`\ell = -(1-\varepsilon)\log\sigma(x) - \varepsilon\log\sigma(-x)`. Wang et al.,
    2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints", https://arxiv.org/abs/2309.16240 (TRL's ``f_divergence_type``). α = 1 is the
    forward KL, α → 0 the reverse KL. At policy = reference the loss is ln 2 for every
    divergence. The exponentials are capped at the dtype's largest finite value (no inf); with
    summed log-probs of long responses the forward-KL and α terms grow like exp(−log-ratio), so
    averaged log-probs are the safer input.

    Args: as :func:`~align_losses.dpo_loss`, plus:
        divergence: ``"reverse_kl"``, ``"forward_kl"``, ``"js_divergence"`` or
            ``"alpha_divergence"``.
        divergence_alpha: α > 0 of the α-divergence (ignored by the others).

    Returns:
        :class:`PreferenceOutput` with ``[B]`` losses and detached rewards β·(π − π_ref).
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    if divergence not in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        raise ValueError(
            "divergence must be 'reverse_kl', 'forward_kl', 'js_divergence' or "
            f"'alpha_divergence', got {divergence!r}"
        )
    if divergence == "alpha_divergence" and not divergence_alpha > 0:
        raise ValueError(f"divergence_alpha must be positive, got {divergence_alpha}")
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if divergence == "reverse_kl":
        gap = chosen - rejected
    elif divergence == "forward_kl":
        gap = _capped_exp(-rejected) - _capped_exp(-chosen)
    elif divergence == "js_divergence":
        gap = (chosen - rejected) - (F.softplus(chosen) - F.softplus(rejected))
    else:
        alpha = divergence_alpha
        gap = (_capped_exp(-alpha * rejected) - _capped_exp(-alpha * chosen)) / alpha
    losses = _smoothed_sigmoid(beta * gap, label_smoothing)
    return _output(losses, chosen, rejected, beta)
