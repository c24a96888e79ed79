"""One entry point for every pairwise preference objective, selected by name, and combinations.

``preference_loss("sigmoid", ...)`` is ``dpo_loss(...)``; ``preference_loss(["sigmoid",
"bco_pair", "sft"], weights=[0.8, 0.2, 1.0], ...)`` is the MPO mixture
``0.8·ℓ_sigmoid + 0.2·ℓ_bco_pair + 1.0·ℓ_sft`` per pair. Names follow TRL's ``loss_type``
where TRL has the objective, and NeMo-Aligner's ``preference_loss`` for ``ipo`` and the ``rpo_*``
divergences. :data:`PREFERENCE_LOSSES` maps each name to its function, whether it needs reference
log-probs, and the keyword arguments the name fixes.

Every input goes by keyword, under the name the loss functions use:

* data: ``policy_chosen_logps``, ``policy_rejected_logps``, ``ref_chosen_logps``,
  ``ref_rejected_logps``, ``chosen_lengths``, ``rejected_lengths``, ``chosen_gt_rewards``,
  ``rejected_gt_rewards``, ``reward_mean`` (the state of ``bco_pair``). A loss receives the data it
  takes; data no selected loss takes is ignored (a trainer may always pass all it has), data a
  selected loss needs and is missing is an error.
* hyperparameters: ``beta``, ``label_smoothing``, ``gamma``, ``alpha``, ... A hyperparameter goes
  to every selected loss that takes it; one that no selected loss takes is an error (a misspelt
  or misapplied setting fails instead of being ignored). Left out, each loss uses its own
  default.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from torch import Tensor

from align_losses.fdpo import fdpo_loss
from align_losses.preference import PreferenceOutput, dpo_loss, ipo_loss, rpo_loss
from align_losses.preference_variants import (
    aot_loss,
    aot_pair_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    nca_pair_loss,
    robust_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
)
from align_losses.reference_free import alphapo_loss, cpo_loss, orpo_loss, sft_loss, simpo_loss

__all__ = [
    "DATA_INPUTS",
    "PREFERENCE_LOSSES",
    "PreferenceLossSpec",
    "needs_reference",
    "preference_loss",
    "preference_loss_parameters",
]

#: Keyword inputs that are data rather than settings: ignored when no selected loss takes them.
DATA_INPUTS = frozenset(
    {
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
        "chosen_gt_rewards",
        "rejected_gt_rewards",
        "reward_mean",
    }
)


class PreferenceLossSpec(NamedTuple):
    """A registered preference objective.

    Attributes:
        fn: the loss function (returns :class:`PreferenceOutput`).
        needs_reference: whether it takes reference log-probs (False: no reference pass needed).
        fixed: keyword arguments the name binds (e.g. ``divergence`` of ``forward_kl``).
    """

    fn: Callable[..., PreferenceOutput]
    needs_reference: bool
    fixed: Mapping[str, Any] = MappingProxyType({})


def _spec(fn: Callable[..., PreferenceOutput], **fixed: Any) -> PreferenceLossSpec:
    params = inspect.signature(fn).parameters
    return PreferenceLossSpec(fn, "ref_chosen_logps" in params, MappingProxyType(fixed))


#: Every objective :func:`preference_loss` accepts, by name.
PREFERENCE_LOSSES: Mapping[str, PreferenceLossSpec] = MappingProxyType(
    {
        # reference-based: DPO and its variants
        "sigmoid": _spec(dpo_loss),
        "dpo": _spec(dpo_loss),  # NeMo-Aligner's name for the same loss
        "ipo": _spec(ipo_loss),
        "rpo_sq": _spec(rpo_loss, divergence="sq"),
        "rpo_bwd_kl": _spec(rpo_loss, divergence="bwd_kl"),
        "rpo_fwd_kl": _spec(rpo_loss, divergence="fwd_kl"),
        "hinge": _spec(hinge_loss),
        "robust": _spec(robust_loss),
        "exo_pair": _spec(exo_pair_loss),
        "nca_pair": _spec(nca_pair_loss),
        "bco_pair": _spec(bco_pair_loss),
        "sppo_hard": _spec(sppo_hard_loss),
        "aot": _spec(aot_loss),
        "aot_pair": _spec(aot_pair_loss),
        "apo_zero": _spec(apo_zero_loss),
        "apo_down": _spec(apo_down_loss),
        "discopop": _spec(discopop_loss),
        "sigmoid_norm": _spec(sigmoid_norm_loss),
        "reverse_kl": _spec(fdpo_loss, divergence="reverse_kl"),
        "forward_kl": _spec(fdpo_loss, divergence="forward_kl"),
        "js_divergence": _spec(fdpo_loss, divergence="js_divergence"),
        "alpha_divergence": _spec(fdpo_loss, divergence="alpha_divergence"),
        # reference-free
        "simpo": _spec(simpo_loss),
        "alphapo": _spec(alphapo_loss),
        "cpo": _spec(cpo_loss),
        "orpo": _spec(orpo_loss),
        "sft": _spec(sft_loss),
    }
)


@functools.cache
def _parameters(name: str) -> tuple[frozenset[str], frozenset[str]]:
    """``(all keyword inputs, required ones)`` of a registered name, less what the name fixes."""
    spec = PREFERENCE_LOSSES[name]
    params = {
        p.name: p
        for p in inspect.signature(spec.fn).parameters.values()
        if p.name not in spec.fixed
    }
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    return frozenset(params), frozenset(required)


def _known_inputs() -> frozenset[str]:
    return frozenset().union(*(_parameters(n)[0] for n in PREFERENCE_LOSSES))


def _names(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError("loss_type names no preference loss")
    unknown = [n for n in names if n not in PREFERENCE_LOSSES]
    if unknown:
        raise ValueError(
            f"unknown preference loss {', '.join(map(repr, unknown))}; valid names: "
            + ", ".join(PREFERENCE_LOSSES)
        )
    if len(set(names)) != len(names):
        raise ValueError(f"preference loss names repeat: {list(names)}")
    return names


def needs_reference(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the named objectives needs reference log-probs.

    Args:
        loss_type: a registered name or a sequence of them.

    Returns:
        False when all are reference-free (``simpo``, ``alphapo``, ``cpo``, ``orpo``, ``sft``):
        the trainer can skip the reference forward pass and hold no reference model.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
    """
    return any(PREFERENCE_LOSSES[n].needs_reference for n in _names(loss_type))


def preference_loss_parameters(loss_type: str | Sequence[str]) -> frozenset[str]:
    """The hyperparameters the named objectives take (everything but the data inputs).

    A trainer can validate its settings against this when it reads its config, e.g. reject
    ``label_smoothing=0.1`` with ``hinge``, and pass :func:`preference_loss` only these.

    Args:
        loss_type: a registered name or a sequence of them.

    Returns:
        The union of the objectives' keyword hyperparameters (``beta``, ``label_smoothing``, ...).

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
    """
    names = _names(loss_type)
    return frozenset().union(*(_parameters(n)[0] for n in names)) - DATA_INPUTS


def preference_loss(
    loss_type: str | Sequence[str],
    *,
    weights: Sequence[float] | None = None,
    pair_weights: Tensor | None = None,
    **inputs: Any,
) -> PreferenceOutput:
    r"""Per-pair loss of one preference objective or a weighted combination of several.

    .. math:: \ell = w_{pair}\sum_k \lambda_k\,\ell_k

    with :math:`\ell_k` the objective named ``loss_type[k]`` (see :data:`PREFERENCE_LOSSES`),
    :math:`\lambda_k` = ``weights[k]`` (default 1 each) and :math:`w_{pair}` the optional detached
    per-pair weights (WPO: :func:`align_losses.wpo_weights`). The returned rewards are those of
    the first objective.

    Args:
        loss_type: a registered name, or a sequence of distinct names to combine.
        weights: one weight per name (finite); None weighs each by 1.
        pair_weights: ``[B]`` weights multiplied into each pair's loss (detached), or None.
            Not with ``aot``/``aot_pair``, whose losses are per quantile, not per pair.
        **inputs: data and hyperparameters by keyword, as described in the module docstring.

    Returns:
        :class:`PreferenceOutput` with ``[B]`` combined losses and the first objective's rewards.

    Raises:
        ValueError: for an unknown name (listing the valid ones), repeated names, a weights list
            of the wrong length, an unknown input, a hyperparameter none of the selected
            objectives takes, a missing input one of them needs, or ``pair_weights`` with a
            per-quantile objective.
    """
    names = _names(loss_type)
    if weights is None:
        weights = [1.0] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} preference losses {names}")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"preference loss weights must be finite, got {weights}")
    unknown = sorted(set(inputs) - _known_inputs())
    if unknown:
        raise ValueError(
            f"unknown preference loss input(s) {unknown}; known: {sorted(_known_inputs())}"
        )
    taken = frozenset().union(*(_parameters(n)[0] for n in names))
    unused = sorted(set(inputs) - taken - DATA_INPUTS)
    if unused:
        raise ValueError(f"{unused} apply to none of the preference losses {list(names)}")

    total: Tensor | None = None
    first: PreferenceOutput | None = None
    for name, weight in zip(names, weights, strict=True):
        accepted, required = _parameters(name)
        missing = sorted(required - set(inputs))
        if missing:
            raise ValueError(f"preference loss {name!r} needs {missing}")
        spec = PREFERENCE_LOSSES[name]
        out = spec.fn(**{k: v for k, v in inputs.items() if k in accepted}, **spec.fixed)
        term = out.losses if weight == 1.0 else weight * out.losses
        total = term if total is None else total + term
        first = out if first is None else first
    if total is None or first is None:  # unreachable: _names rejects an empty selection
        raise ValueError("loss_type names no preference loss")
    if pair_weights is not None:
        quantile = [n for n in names if n in ("aot", "aot_pair")]
        if quantile:
            raise ValueError(f"{quantile} return per-quantile losses; pair_weights cannot apply")
        if pair_weights.shape != total.shape:
            raise ValueError("pair_weights must have the shape of the per-pair losses")
        total = total * pair_weights.detach().to(total.dtype)
    return PreferenceOutput(total, first.chosen_rewards, first.rejected_rewards)
