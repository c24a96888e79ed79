"""Memory-lean loss functions for preference alignment and distillation.

Pure functions over torch tensors, torch as the only dependency: per-token and per-sequence
log-probabilities (optionally vocabulary-parallel, optionally fused with the output layer), the
DPO family (DPO/cDPO, IPO, reward-aware RPO, SPIN), KTO, and top-K logit distillation. Every loss
returns per-example tensors; reducing them is the caller's choice.
"""

from importlib.metadata import PackageNotFoundError, version

from align_losses.distill import topk_kd_loss
from align_losses.kto import KTOOutput, kto_loss
from align_losses.logps import chunked_linear_logps, sequence_logps, token_logps
from align_losses.preference import PreferenceOutput, dpo_loss, ipo_loss, rpo_loss, spin_loss

try:
    __version__ = version("align-losses")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "KTOOutput",
    "PreferenceOutput",
    "__version__",
    "chunked_linear_logps",
    "dpo_loss",
    "ipo_loss",
    "kto_loss",
    "rpo_loss",
    "sequence_logps",
    "spin_loss",
    "token_logps",
    "topk_kd_loss",
]
