r"""Per-class terms of the distillation divergences between a teacher p and a student q.

Every divergence here is a sum over classes c (vocabulary tokens, or the top-K ids and the tail
bucket) of a term that depends only on :math:`(p_c, q_c)`; the skewed and generalised
Jensen-Shannon divergences go through the mixture

.. math::
    m_c = \lambda\,p_c + (1 - \lambda)\,q_c, \qquad
    \log m_c = \mathrm{logaddexp}(\log p_c + \log\lambda,\ \log q_c + \log(1 - \lambda))

formed in probability space from log-probabilities (never as a mix of log-probabilities), with
:math:`\lambda` the teacher's weight:

* ``forward_kl``: :math:`p(\log p - \log q)`;
* ``reverse_kl``: :math:`q(\log q - \log p)`;
* ``jsd``: :math:`\beta p(\log p - \log m) + (1-\beta) q(\log q - \log m)`, λ = β;
* ``skew_forward_kl``: :math:`p(\log p - \log m)`, λ = α;
* ``skew_reverse_kl``: :math:`q(\log q - \log m)`, λ = 1 − α.

:func:`pointwise_grad` is the derivative of a term with respect to :math:`\log q_c`, the student
log-probability taken as a free variable; the gradient with respect to the student logits
:math:`z` of a divergence :math:`D = \sum_c f_c` is then :math:`g_c - q_c \sum_{c'} g_{c'}`.
Log-probabilities are clamped at the lowest finite float before they enter a term, so every
factor next to a probability is finite and a class with :math:`p_c = 0` (or :math:`q_c = 0`)
contributes exactly 0 (:math:`0 \log 0 = 0`) in value and gradient, without a mask: a class
that is impossible under one side never produces NaN.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "MIXTURE_KINDS",
    "KDDivergence",
    "clamp_log",
    "log_mixture",
    "pointwise_grad",
    "pointwise_terms",
    "resolve_divergence",
]

KDDivergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"]
"""Divergence between the teacher's p and the student's q (see the module docstring)."""

MIXTURE_KINDS = ("jsd", "skew_forward_kl", "skew_reverse_kl")
"""The kinds that go through the mixture m."""

_KINDS = ("forward_kl", "reverse_kl", *MIXTURE_KINDS)


def resolve_divergence(divergence: str, beta: float, skew: float) -> tuple[str, float]:
    """The kind actually computed and the teacher's weight λ in the mixture.

    ``jsd`` at β = 0 is the forward KL and at β = 1 the reverse KL (GKD's and TRL's endpoints);
    the skewed KLs at α = 0 are the plain KLs. Those endpoints are returned as the plain kinds,
    so their values are the plain KLs bit for bit.

    Args:
        divergence: One of `KDDivergence`.
        beta: β of ``jsd``, in [0, 1].
        skew: α of the skewed KLs, in [0, 1).

    Returns:
        ``(kind, lam)``; ``lam`` is 0.0 for the plain KLs (unused).

    Raises:
        ValueError: On an unknown divergence or a β / α out of range.
    """
    if divergence not in _KINDS:
        raise ValueError(f"divergence must be one of {', '.join(_KINDS)}; got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    if divergence == "jsd":
        if beta == 0.0:
            return "forward_kl", 0.0
        if beta == 1.0:
            return "reverse_kl", 0.0
        return "jsd", float(beta)
    if divergence in ("skew_forward_kl", "skew_reverse_kl") and skew == 0.0:
        return divergence.removeprefix("skew_"), 0.0
    if divergence == "skew_forward_kl":
        return divergence, float(skew)
    if divergence == "skew_reverse_kl":
        return divergence, 1.0 - float(skew)
    return divergence, 0.0


def clamp_log(log_x: Tensor) -> Tensor:
    """``log_x`` with ``−inf`` raised to the lowest finite float of its dtype."""
    return log_x.clamp(min=torch.finfo(log_x.dtype).min)


def log_mixture(log_p: Tensor, log_q: Tensor, kind: str, lam: float) -> Tensor | None:
    """``log(λ p + (1 − λ) q)`` from (clamped, finite) log-probabilities; None for plain KLs."""
    return _mix(log_p, log_q, lam) if kind in MIXTURE_KINDS else None


def _mix(log_p: Tensor, log_q: Tensor, lam: float) -> Tensor:
    return torch.logaddexp(log_p + math.log(lam), log_q + math.log1p(-lam))


def pointwise_terms(
    p: Tensor,
    log_p: Tensor,
    q: Tensor,
    log_q: Tensor,
    kind: str,
    lam: float,
    log_m: Tensor | None = None,
) -> Tensor:
    """Per-class terms of ``kind`` (the module docstring); sum them over classes for the divergence.

    Args:
        p: Teacher probabilities.
        log_p: Their logs, clamped to be finite (:func:`clamp_log`).
        q: Student probabilities.
        log_q: Their logs, clamped to be finite.
        kind: A kind returned by :func:`resolve_divergence`.
        lam: The teacher's weight λ in the mixture (mixture kinds only).
        log_m: :func:`log_mixture` of the same inputs when already at hand.

    Returns:
        A tensor shaped like ``p`` (differentiable in ``q`` and ``log_q``).
    """
    if kind == "forward_kl":
        return p * (log_p - log_q)
    if kind == "reverse_kl":
        return q * (log_q - log_p)
    if log_m is None:
        log_m = _mix(log_p, log_q, lam)
    if kind == "skew_forward_kl":
        return p * (log_p - log_m)
    if kind == "skew_reverse_kl":
        return q * (log_q - log_m)
    return lam * p * (log_p - log_m) + (1.0 - lam) * q * (log_q - log_m)


def pointwise_grad(
    p: Tensor,
    log_p: Tensor,
    q: Tensor,
    log_q: Tensor,
    kind: str,
    lam: float,
    log_m: Tensor | None = None,
) -> Tensor:
    r"""Derivative of each :func:`pointwise_terms` term with respect to :math:`\log q_c`.

    With :math:`b = \log q`, :math:`w = (1-\lambda) q / m` (so :math:`\partial \log m /
    \partial b = w`):

    * ``forward_kl``: :math:`-p`; ``reverse_kl``: :math:`q(b - \log p + 1)`;
    * ``jsd``: :math:`(1-\beta)\,q\,(b - \log m)` (the p-side and q-side mixture derivatives
      cancel, since :math:`\beta p + (1-\beta) q = m`);
    * ``skew_forward_kl``: :math:`-p\,w`; ``skew_reverse_kl``: :math:`q(b - \log m + 1 - w)`.

    The arguments are those of :func:`pointwise_terms`.

    Returns:
        A tensor shaped like ``p``.
    """
    if kind == "forward_kl":
        return -p
    if kind == "reverse_kl":
        return q * (log_q - log_p + 1.0)
    if log_m is None:
        log_m = _mix(log_p, log_q, lam)
    if kind == "jsd":
        return (1.0 - lam) * q * (log_q - log_m)
    w = torch.exp(math.log1p(-lam) + log_q - log_m)
    if kind == "skew_forward_kl":
        return -(p * w)
    return q * (log_q - log_m + 1.0 - w)
