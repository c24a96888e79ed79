"""DPO family (DPO, cDPO, IPO, reward-aware RPO) with an optional SFT term.

One module of the common algorithm shape: `DPOConfig`, `dpo_micro_batch` (how a micro-batch of
pairs becomes a model batch), and `DPOStep` (global-batch normaliser, loss function, metrics).
The loss math lives in `align_losses` only; this module picks the function, feeds it per-sequence
log-probs and reduces the per-pair losses over the global batch:

    loss = Σ_pairs [w_pref · ℓ_pref + w_sft · ℓ_sft] / (pairs in the global batch)

so micro-batch 1 × accumulation 8 equals micro-batch 8 × accumulation 1.

Forward layout. Chosen and rejected sequences go through the model in one batch: padded, the
``b`` chosen rows come first and the ``b`` rejected rows after them; packed, each pair's two
sequences share a row. Either way sequence ``i < b`` is the chosen response of pair ``i`` and
sequence ``b + i`` its rejected response (``segment_ids``).

Logged rewards are the implicit rewards ``β·(π − π_ref)`` that `align_losses` returns (the DPO
paper's convention, which NeMo-Aligner's documentation also states, though its code logged the
unscaled log-ratio); ``acc`` is the fraction of pairs with chosen reward > rejected reward.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from align_core.algorithms._common import (
    ModelBatch,
    batch_device,
    padded_model_batch,
    segment_sums,
    upcast,
)
from align_core.algorithms._packed import packed_model_batch
from align_core.schedule import LossFn
from align_data.batches import PreferenceBatch
from align_data.collate import CollateConfig, collate_preference
from align_data.packing import collate_packed_preference
from align_data.tokenize import PreferenceExample

__all__ = ["DPOConfig", "DPOStep", "PreferenceLoss", "dpo_loss_and_metrics", "dpo_model_batch"]

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
            the training micro-batch size (the same micro-batches as the policy forward, so the
            reference and policy log-probs at step 0 are bitwise equal).
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
        if self.preference_loss not in ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"):
            raise ValueError(
                f"model.dpo.preference_loss: {self.preference_loss!r} is not one of dpo, ipo, "
                "rpo_sq, rpo_bwd_kl, rpo_fwd_kl"
            )
        if self.preference_loss_weight == 0 and self.sft_loss_weight == 0:
            raise ValueError("model.dpo: preference_loss_weight and sft_loss_weight are both 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"model.dpo.label_smoothing: {self.label_smoothing} not in [0, 0.5)")
        if self.label_smoothing and self.preference_loss != "dpo":
            raise ValueError(
                "model.dpo.label_smoothing applies to preference_loss=dpo only, "
                f"not {self.preference_loss!r}"
            )
        if self.ref_policy_kl_penalty <= 0:
            raise ValueError("model.dpo.ref_policy_kl_penalty must be > 0")
        if self.log_prob_forward_micro_batch_size is not None and (
            self.log_prob_forward_micro_batch_size < 1
        ):
            raise ValueError("model.dpo.log_prob_forward_micro_batch_size must be >= 1")

    @property
    def sft_average(self) -> bool:
        """Whether the SFT term averages over tokens (``sft_average_log_probs`` resolved)."""
        if self.sft_average_log_probs is None:
            return self.preference_average_log_probs
        return self.sft_average_log_probs


def dpo_model_batch(batch: PreferenceBatch) -> ModelBatch:
    """The model batch of a collated preference batch (chosen rows first, then rejected)."""
    out = padded_model_batch(batch.input_ids, batch.labels, batch.position_ids, batch.lengths)
    out["chosen_gt_rewards"] = batch.chosen_rewards
    out["rejected_gt_rewards"] = batch.rejected_rewards
    out["sample_index"] = batch.sample_indices
    return out


def _preference_output(cfg: DPOConfig, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, batch):
    from align_losses import dpo_loss, ipo_loss, rpo_loss

    beta = cfg.ref_policy_kl_penalty
    if cfg.preference_loss == "dpo":
        return dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=cfg.label_smoothing)
    if cfg.preference_loss == "ipo":
        return ipo_loss(pc, pr, rc, rr, beta=beta)
    return rpo_loss(
        pc,
        pr,
        rc,
        rr,
        batch["chosen_gt_rewards"],
        batch["rejected_gt_rewards"],
        beta=beta,
        gt_reward_scale=cfg.gt_reward_scale,
        divergence=cfg.preference_loss.removeprefix("rpo_"),
    )


def dpo_loss_and_metrics(
    cfg: DPOConfig, normalizer: Tensor, batch: Mapping[str, Tensor], token_logps: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch of pairs (the `align_core.schedule` loss contract).

    Args:
        cfg: DPO settings.
        normalizer: Pairs in the global batch.
        batch: The model batch (``segment_ids``, ``seq_token_counts``, ``ref_logps``, and the
            ground-truth rewards for RPO).
        token_logps: ``[R, S]`` policy token log-probs from the forward.

    Returns:
        ``Σ per-pair loss / normalizer`` and detached metric *sums* over the micro-batch's pairs
        (``loss``, ``preference_loss``, ``sft_loss``, ``acc``, ``rewards_chosen``,
        ``rewards_rejected``, ``pairs``).
    """
    counts = batch["seq_token_counts"]
    n = counts.numel()
    b = n // 2
    policy = segment_sums(upcast(token_logps), batch["segment_ids"], n)
    ref = batch["ref_logps"].to(policy.dtype)
    denom = counts.to(policy.dtype).clamp(min=1.0)
    pol_p, ref_p = (
        (policy / denom, ref / denom) if cfg.preference_average_log_probs else (policy, ref)
    )
    out = _preference_output(cfg, pol_p[:b], pol_p[b:], ref_p[:b], ref_p[b:], batch)
    per_pair = cfg.preference_loss_weight * out.losses
    sft = -(policy[:b] / denom[:b] if cfg.sft_average else policy[:b])
    if cfg.sft_loss_weight:
        per_pair = per_pair + cfg.sft_loss_weight * sft
    loss = per_pair.sum() / normalizer
    metrics = {
        "loss": per_pair.detach().sum(),
        "preference_loss": out.losses.detach().sum(),
        "sft_loss": sft.detach().sum(),
        "acc": (out.chosen_rewards > out.rejected_rewards).float().sum(),
        "rewards_chosen": out.chosen_rewards.sum(),
        "rewards_rejected": out.rejected_rewards.sum(),
        "pairs": torch.tensor(float(b), device=policy.device),
    }
    return loss, metrics


@dataclass(frozen=True)
class DPOStep:
    """The DPO family as an `align_core.algorithms.AlgorithmStep`.

    Attributes:
        config: DPO settings.
        name: ``"dpo"``.
        needs_reference: True.
        ref_shape: 2 (chosen and rejected reference log-prob sums per pair).
    """

    config: DPOConfig
    name: str = "dpo"
    needs_reference: bool = True
    ref_shape: int = 2

    def build_micro_batch(
        self, examples: Sequence[PreferenceExample], collate: CollateConfig
    ) -> ModelBatch:
        """Collate ``examples`` (pairs) into one padded model batch."""
        return dpo_model_batch(collate_preference(examples, collate))

    def build_packed_micro_batch(
        self, examples: Sequence[PreferenceExample], collate: CollateConfig, capacity: int
    ) -> ModelBatch:
        """Pack ``examples`` (each pair's two sequences in one row) into one model batch."""
        packed = collate_packed_preference(examples, collate, capacity=capacity)
        out = packed_model_batch(packed)
        out["chosen_gt_rewards"] = packed.chosen_rewards
        out["rejected_gt_rewards"] = packed.rejected_rewards
        out["sample_index"] = packed.sample_indices
        return out

    def normalizer(self, micro_batches: Sequence[ModelBatch], global_examples: int) -> Tensor:
        """Pairs in the global batch (per-pair losses are averaged over the global batch)."""
        return torch.tensor(float(global_examples), device=batch_device(micro_batches))

    def loss_fn(self, normalizer: Tensor) -> LossFn:
        """The micro-batch loss with ``normalizer`` bound."""
        return functools.partial(dpo_loss_and_metrics, self.config, normalizer)

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Means over the global batch's pairs, and ``rewards_margin``."""
        pairs = max(sums["pairs"], 1.0)
        out = {k: sums[k] / pairs for k in ("loss", "preference_loss", "sft_loss", "acc")}
        out["rewards_chosen_mean"] = sums["rewards_chosen"] / pairs
        out["rewards_rejected_mean"] = sums["rewards_rejected"] / pairs
        out["rewards_margin"] = out["rewards_chosen_mean"] - out["rewards_rejected_mean"]
        return out
