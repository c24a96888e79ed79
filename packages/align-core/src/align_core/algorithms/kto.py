"""KTO: unpaired desirable/undesirable examples against a KL baseline from mismatched pairs."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KTOConfig"]


@dataclass
class KTOConfig:
    """``model.kto``: NeMo-Aligner's names and defaults.

    Attributes:
        ref_policy_kl_penalty: β.
        desirable_loss_weight: λ_D, weight of desirable examples' losses.
        undesirable_loss_weight: λ_U, weight of undesirable examples' losses.
        preference_average_log_probs: Average response log-probs over tokens instead of summing.
        log_prob_forward_micro_batch_size: Sequences per reference forward micro-batch; None
            uses twice the training micro-batch size (samples and KL samples).
    """

    ref_policy_kl_penalty: float = 0.2
    desirable_loss_weight: float = 1.0
    undesirable_loss_weight: float = 1.0
    preference_average_log_probs: bool = False
    log_prob_forward_micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.ref_policy_kl_penalty <= 0:
            raise ValueError("model.kto.ref_policy_kl_penalty must be > 0")
        if self.desirable_loss_weight < 0 or self.undesirable_loss_weight < 0:
            raise ValueError("model.kto: loss weights must be >= 0")
