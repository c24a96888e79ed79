"""DPO family (DPO, cDPO, IPO, reward-aware RPO) with an optional SFT term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DPOConfig", "PreferenceLoss"]

PreferenceLoss = Literal["dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"]


@dataclass
class DPOConfig:
    """``model.dpo``: NeMo-Aligner's names and defaults, plus cDPO label smoothing.

    Attributes:
        ref_policy_kl_penalty: β, the strength of the implicit KL penalty.
        preference_loss: Which preference loss (``dpo``, ``ipo``, ``rpo_sq``, ``rpo_bwd_kl``,
            ``rpo_fwd_kl``).
        label_smoothing: cDPO's ε (only for ``dpo``); 0 is plain DPO.
        preference_loss_weight: Weight of the preference term.
        sft_loss_weight: Weight of the SFT (chosen NLL) term; 0 turns it off.
        preference_average_log_probs: Average response log-probs over tokens instead of summing.
        sft_average_log_probs: Same for the SFT term; None mirrors
            ``preference_average_log_probs``.
        gt_reward_scale: η, scale of the ground-truth reward gap for RPO.
        log_prob_forward_micro_batch_size: Pairs per reference forward micro-batch; None uses
            the training micro-batch size.
    """

    ref_policy_kl_penalty: float = 0.2
    preference_loss: PreferenceLoss = "dpo"
    label_smoothing: float = 0.0
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool | None = None
    gt_reward_scale: float = 1.0
    log_prob_forward_micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.preference_loss_weight == 0 and self.sft_loss_weight == 0:
            raise ValueError("model.dpo: preference_loss_weight and sft_loss_weight are both 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"model.dpo.label_smoothing: {self.label_smoothing} not in [0, 0.5)")
        if self.ref_policy_kl_penalty <= 0:
            raise ValueError("model.dpo.ref_policy_kl_penalty must be > 0")
