"""Memory-lean loss functions for preference alignment and distillation.

Pure functions over torch tensors, torch as the only dependency: per-token and per-sequence
log-probabilities (optionally vocabulary-parallel, optionally fused with the output layer), the
DPO family (DPO/cDPO, IPO, reward-aware RPO, SPIN, and the variants selectable by name through
`preference_loss`), reference-free objectives (SimPO, CPO, AlphaPO, ORPO), KTO, and logit
distillation (top-K or full-vocabulary: KL, generalised JSD, skewed KL). Every loss returns
per-example tensors; reducing them is the caller's choice.
"""

from importlib.metadata import PackageNotFoundError, version

from align_losses.distill import KDDivergence, full_vocab_kd_loss, topk_kd_loss
from align_losses.fdpo import fdpo_loss
from align_losses.kto import KTOOutput, kto_loss
from align_losses.logps import chunked_linear_logps, sequence_logps, token_logps
from align_losses.preference import PreferenceOutput, dpo_loss, ipo_loss, rpo_loss, spin_loss
from align_losses.preference_inputs import (
    ld_logps,
    masked_mean,
    split_at_shared_length,
    wpo_token_adjustment,
    wpo_weights,
)
from align_losses.preference_registry import (
    PREFERENCE_LOSSES,
    PreferenceLossSpec,
    needs_reference,
    preference_loss,
    preference_loss_parameters,
)
from align_losses.preference_variants import (
    RewardMean,
    aot_loss,
    aot_pair_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    bco_reward_mean,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    nca_pair_loss,
    robust_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
)
from align_losses.reference_free import alphapo_loss, cpo_loss, orpo_loss, sft_loss, simpo_loss

try:
    __version__ = version("align-losses")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "PREFERENCE_LOSSES",
    "KDDivergence",
    "KTOOutput",
    "PreferenceLossSpec",
    "PreferenceOutput",
    "RewardMean",
    "__version__",
    "alphapo_loss",
    "aot_loss",
    "aot_pair_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "bco_reward_mean",
    "chunked_linear_logps",
    "cpo_loss",
    "discopop_loss",
    "dpo_loss",
    "exo_pair_loss",
    "fdpo_loss",
    "full_vocab_kd_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "ld_logps",
    "masked_mean",
    "nca_pair_loss",
    "needs_reference",
    "orpo_loss",
    "preference_loss",
    "preference_loss_parameters",
    "robust_loss",
    "rpo_loss",
    "sequence_logps",
    "sft_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "spin_loss",
    "split_at_shared_length",
    "sppo_hard_loss",
    "token_logps",
    "topk_kd_loss",
    "wpo_token_adjustment",
    "wpo_weights",
]
