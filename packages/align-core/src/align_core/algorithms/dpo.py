"""The DPO family: every pairwise preference objective of `align_losses`, plus an SFT term.

One module of the common algorithm shape: `DPOConfig`, `dpo_micro_batch` (how a micro-batch of
pairs becomes a model batch), and `DPOStep` (global-batch normaliser, loss function, metrics).
The loss math lives in `align_losses` only (`align_losses.preference_loss`: DPO/cDPO, IPO, RPO,
the DPO variants, f-DPO, the reference-free SimPO/AlphaPO/CPO/ORPO, and weighted combinations of
them); this module feeds it per-sequence log-probs and token counts and reduces the per-pair
losses over the global batch:

    loss = Σ_pairs [w_pref · ℓ_pref + w_sft · ℓ_sft] / (pairs in the global batch)

so micro-batch 1 × accumulation 8 equals micro-batch 8 × accumulation 1.

Forward layout. Chosen and rejected sequences go through the model in one batch: padded, the
``b`` chosen rows come first and the ``b`` rejected rows after them; packed, each pair's two
sequences share a row. Either way sequence ``i < b`` is the chosen response of pair ``i`` and
sequence ``b + i`` its rejected response (``segment_ids``).

``bco_pair`` (alone or in a combination) shifts the rewards by their running mean δ, which the
step keeps (`BCORewardMean`): folded micro-batch by micro-batch during training over the
data-parallel group (TRL's order: a micro-batch's own rewards are part of its δ, so this one
objective depends on the micro-batch size), read without folding by forward-only passes
(validation), and saved with every checkpoint through the step's ``state_dict``.

Logged rewards are the implicit rewards ``β·(π − π_ref)`` that `align_losses` returns (the DPO
paper's convention, which NeMo-Aligner's documentation also states, though its code logged the
unscaled log-ratio); ``acc`` is the fraction of pairs with chosen reward > rejected reward.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
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

__all__ = [
    "BCORewardMean",
    "DPOConfig",
    "DPOStep",
    "PreferenceLoss",
    "dpo_loss_and_metrics",
    "dpo_model_batch",
]

PreferenceLoss = str
"""A name of `align_losses.PREFERENCE_LOSSES` (``dpo``, ``ipo``, ``rpo_bwd_kl``, ``hinge``,
``simpo``, ...)."""

_SETTINGS = (
    "gamma",
    "alpha",
    "nll_weight",
    "odds_ratio_weight",
    "divergence_alpha",
    "discopop_tau",
)
"""`DPOConfig` fields passed to the losses under their own name when set (None: the loss's own
default, so each default has one home: its loss function)."""


@dataclass
class DPOConfig:
    """``model.dpo``: NeMo-Aligner's names and defaults, plus cDPO label smoothing.

    Attributes:
        ref_policy_kl_penalty: β, the strength of the implicit KL penalty (the β of every
            objective, reference-free ones included).
        preference_loss: Which preference objective (a name of `align_losses.PREFERENCE_LOSSES`:
            ``dpo``, ``ipo``, ``rpo_sq``/``rpo_bwd_kl``/``rpo_fwd_kl``, ``hinge``, ``robust``,
            ``simpo``, ``orpo``, ...), or a list of names combined with
            ``preference_loss_weights`` (as MPO does). Reference-free objectives (``simpo``,
            ``alphapo``, ``cpo``, ``orpo``, ``sft``) need no reference pass.
        preference_loss_weights: One weight per name of a combination (None: 1 each).
        label_smoothing: ε of the objectives that take it (cDPO for ``dpo``, robust DPO, EXO,
            ...); 0 is the plain objective.
        preference_loss_weight: Weight of the preference term.
        sft_loss_weight: Weight of the SFT (chosen NLL) term; 0 turns it off.
        preference_average_log_probs: Average response log-probs over tokens instead of summing.
        sft_average_log_probs: Same for the SFT term; None mirrors
            ``preference_average_log_probs``.
        gt_reward_scale: η, scale of the ground-truth reward gap for RPO.
        log_prob_forward_micro_batch_size: Pairs per reference forward micro-batch; None uses
            the training micro-batch size (the same micro-batches as the policy forward, so the
            reference and policy log-probs at step 0 are bitwise equal).
        gamma: SimPO/AlphaPO target margin γ (None: the loss's default).
        alpha: AlphaPO's α (None: the loss's default).
        nll_weight: CPO's NLL weight λ (None: the loss's default).
        odds_ratio_weight: ORPO's odds-ratio weight λ (None: the loss's default).
        divergence_alpha: α of the f-DPO ``alpha_divergence`` (None: the loss's default).
        discopop_tau: DiscoPOP's τ (None: the loss's default).
        ld_alpha: LD-DPO's α in [0, 1]: the policy log-prob of the longer response of a pair
            counts its tokens past the shorter one's length times α (None: off; 1 is DPO).
        wpo: Weight each pair's loss by WPO's off-policy weight (the product of the two
            responses' length-normalised probabilities under the current policy, detached).
    """

    ref_policy_kl_penalty: float = 0.2
    preference_loss: str | tuple[str, ...] = "dpo"
    preference_loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool | None = None
    gt_reward_scale: float = 1.0
    log_prob_forward_micro_batch_size: int | None = None
    gamma: float | None = None
    alpha: float | None = None
    nll_weight: float | None = None
    odds_ratio_weight: float | None = None
    divergence_alpha: float | None = None
    discopop_tau: float | None = None
    ld_alpha: float | None = None
    wpo: bool = False

    def __post_init__(self) -> None:
        from align_losses import preference_loss_parameters

        if not isinstance(self.preference_loss, str):
            self.preference_loss = tuple(self.preference_loss)
        if self.preference_loss_weights is not None:
            self.preference_loss_weights = tuple(float(w) for w in self.preference_loss_weights)
            if len(self.preference_loss_weights) != len(self.losses):
                raise ValueError(
                    f"model.dpo.preference_loss_weights: {len(self.preference_loss_weights)} "
                    f"weights for {len(self.losses)} preference losses {list(self.losses)}"
                )
        try:
            accepted = preference_loss_parameters(self.losses)
        except ValueError as exc:
            raise ValueError(
                f"model.dpo.preference_loss: {exc}{_suggestion(self.losses)}"
            ) from None
        if self.preference_loss_weight == 0 and self.sft_loss_weight == 0:
            raise ValueError("model.dpo: preference_loss_weight and sft_loss_weight are both 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"model.dpo.label_smoothing: {self.label_smoothing} not in [0, 0.5)")
        given = {k for k in _SETTINGS if getattr(self, k) is not None}
        if self.label_smoothing:
            given.add("label_smoothing")
        for key in sorted(given - accepted):
            raise ValueError(
                f"model.dpo.{key} applies to none of the preference losses "
                f"{list(self.losses)} (theirs: {', '.join(sorted(accepted)) or 'none'})"
            )
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"model.dpo.ld_alpha: {self.ld_alpha} not in [0, 1]")
        if self.ref_policy_kl_penalty <= 0:
            raise ValueError("model.dpo.ref_policy_kl_penalty must be > 0")
        if self.log_prob_forward_micro_batch_size is not None and (
            self.log_prob_forward_micro_batch_size < 1
        ):
            raise ValueError("model.dpo.log_prob_forward_micro_batch_size must be >= 1")

    @property
    def losses(self) -> tuple[str, ...]:
        """The selected objective names (one, or those of a combination)."""
        if isinstance(self.preference_loss, str):
            return (self.preference_loss,)
        return tuple(self.preference_loss)

    @property
    def needs_reference(self) -> bool:
        """Whether any selected objective uses reference log-probs (a reference pass)."""
        from align_losses import needs_reference

        return needs_reference(self.losses)

    def loss_settings(self) -> dict[str, float]:
        """The hyperparameters to pass `align_losses.preference_loss`.

        Only those its objectives take; unset ones keep the loss's own default.
        """
        from align_losses import preference_loss_parameters

        values: dict[str, float] = {
            "beta": self.ref_policy_kl_penalty,
            "label_smoothing": self.label_smoothing,
            "gt_reward_scale": self.gt_reward_scale,
        }
        values.update({k: v for k in _SETTINGS if (v := getattr(self, k)) is not None})
        accepted = preference_loss_parameters(self.losses)
        return {k: v for k, v in values.items() if k in accepted}

    @property
    def sft_average(self) -> bool:
        """Whether the SFT term averages over tokens (``sft_average_log_probs`` resolved)."""
        if self.sft_average_log_probs is None:
            return self.preference_average_log_probs
        return self.sft_average_log_probs


def _suggestion(names: Sequence[str]) -> str:
    """``; did you mean 'ipo'?`` for the first unknown name close to a known one."""
    import difflib

    from align_losses import PREFERENCE_LOSSES

    for name in names:
        if name not in PREFERENCE_LOSSES:
            match = difflib.get_close_matches(name, list(PREFERENCE_LOSSES), n=1)
            if match:
                return f"; did you mean {match[0]!r}?"
    return ""


class BCORewardMean:
    """``bco_pair``'s running reward mean δ, kept across steps and checkpoints.

    Attributes:
        group: The data-parallel group the rewards are pooled over (None: unsplit).
        state: The running mean and its count (None before the first training micro-batch).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        """Start with no rewards seen (δ = 0)."""
        self.group = group
        self.state: Any = None

    def delta(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
        """δ for this micro-batch: folded with its rewards when training, as is otherwise.

        A forward-only pass (``torch.no_grad``: validation) must not move δ.
        """
        from align_losses import bco_reward_mean

        if torch.is_grad_enabled():
            self.state = bco_reward_mean(
                self.state, chosen_rewards, rejected_rewards, group=self.group
            )
        if self.state is None:
            return chosen_rewards.new_zeros(())
        return self.state.mean.to(chosen_rewards.device)

    def state_dict(self) -> dict[str, float]:
        """δ and its count as plain floats (empty before the first update)."""
        if self.state is None:
            return {}
        return {"mean": float(self.state.mean), "count": float(self.state.count)}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore what `state_dict` saved."""
        from align_losses import RewardMean

        self.state = None
        if state:
            self.state = RewardMean(
                torch.tensor(state["mean"], dtype=torch.float64),
                torch.tensor(state["count"], dtype=torch.float64),
            )


def dpo_model_batch(batch: PreferenceBatch) -> ModelBatch:
    """The model batch of a collated preference batch (chosen rows first, then rejected)."""
    out = padded_model_batch(batch.input_ids, batch.labels, batch.position_ids, batch.lengths)
    out["chosen_gt_rewards"] = batch.chosen_rewards
    out["rejected_gt_rewards"] = batch.rejected_rewards
    out["sample_index"] = batch.sample_indices
    return out


def _policy_logps(
    cfg: DPOConfig, token_logps: Tensor, batch: Mapping[str, Tensor], counts: Tensor
) -> Tensor:
    """Per-sequence policy log-prob sums (LD-DPO: the longer response's excess scaled by α)."""
    n = counts.numel()
    if cfg.ld_alpha is None:
        return segment_sums(upcast(token_logps), batch["segment_ids"], n)
    from align_losses import ld_logps, split_at_shared_length

    b = n // 2
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)
    parts = split_at_shared_length(upcast(token_logps), batch["segment_ids"], shared)
    return ld_logps(*parts, ld_alpha=cfg.ld_alpha)


def _preference_output(
    cfg: DPOConfig,
    policy: Tensor,
    ref: Tensor | None,
    lengths: Tensor,
    batch,
    b: int,
    reward_mean: BCORewardMean | None,
):
    """The selected objective(s) over the pairs of one micro-batch."""
    from align_losses import preference_loss, wpo_weights

    inputs = {
        "policy_chosen_logps": policy[:b],
        "policy_rejected_logps": policy[b:],
        "chosen_lengths": lengths[:b],
        "rejected_lengths": lengths[b:],
    }
    for key in ("chosen_gt_rewards", "rejected_gt_rewards"):  # RPO's ground-truth rewards
        if key in batch:
            inputs[key] = batch[key]
    if ref is not None:
        inputs.update(ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:])
    if reward_mean is not None and ref is not None:
        rewards = cfg.ref_policy_kl_penalty * (policy - ref).detach()
        inputs["reward_mean"] = reward_mean.delta(rewards[:b], rewards[b:])
    pair_weights = None
    if cfg.wpo:
        pair_weights = wpo_weights(policy[:b], policy[b:], lengths[:b], lengths[b:])
    name = cfg.preference_loss if isinstance(cfg.preference_loss, str) else list(cfg.losses)
    return preference_loss(
        name,
        weights=cfg.preference_loss_weights,
        pair_weights=pair_weights,
        **inputs,
        **cfg.loss_settings(),
    )


def dpo_loss_and_metrics(
    cfg: DPOConfig,
    normalizer: Tensor,
    batch: Mapping[str, Tensor],
    token_logps: Tensor,
    *,
    reward_mean: BCORewardMean | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch of pairs (the `align_core.schedule` loss contract).

    Args:
        cfg: DPO settings.
        normalizer: Pairs in the global batch.
        batch: The model batch (``segment_ids``, ``seq_token_counts``, ``ref_logps``, and the
            ground-truth rewards for RPO).
        token_logps: ``[R, S]`` policy token log-probs from the forward.
        reward_mean: ``bco_pair``'s running reward mean (required when it is selected).

    Returns:
        ``Σ per-pair loss / normalizer`` and detached metric *sums* over the micro-batch's pairs
        (``loss``, ``preference_loss``, ``sft_loss``, ``acc``, ``rewards_chosen``,
        ``rewards_rejected``, ``pairs``).
    """
    counts = batch["seq_token_counts"]
    n = counts.numel()
    b = n // 2
    policy = _policy_logps(cfg, token_logps, batch, counts)
    ref = batch["ref_logps"].to(policy.dtype) if cfg.needs_reference else None
    denom = counts.to(policy.dtype).clamp(min=1.0)
    if cfg.preference_average_log_probs:
        # Averaged log-probs are per token already: length-normalising losses get lengths 1.
        pol_p = policy / denom
        ref_p = None if ref is None else ref / denom
        lengths = torch.ones_like(denom)
    else:
        pol_p, ref_p, lengths = policy, ref, denom
    out = _preference_output(cfg, pol_p, ref_p, lengths, batch, b, reward_mean)
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
        group: The data-parallel group (``bco_pair`` pools its reward mean over it).
        name: ``"dpo"``.
        ref_shape: 2 (chosen and rejected reference log-prob sums per pair).
        reward_mean: ``bco_pair``'s running reward mean (None when it is not selected).
    """

    config: DPOConfig
    group: dist.ProcessGroup | None = None
    name: str = "dpo"
    ref_shape: int = 2
    reward_mean: BCORewardMean | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if "bco_pair" in self.config.losses:
            object.__setattr__(self, "reward_mean", BCORewardMean(self.group))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the step: ``bco_pair``'s reward mean (else nothing)."""
        if self.reward_mean is None:
            return {}
        return {"reward_mean": self.reward_mean.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        if self.reward_mean is not None:
            self.reward_mean.load_state_dict(state.get("reward_mean", {}))

    @property
    def needs_reference(self) -> bool:
        """Whether the selected objective(s) use reference log-probs (False: SimPO, ORPO...)."""
        return self.config.needs_reference

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
        # collate_packed_preference always sets the rewards (None only for unpaired data).
        assert packed.chosen_rewards is not None and packed.rejected_rewards is not None
        out["chosen_gt_rewards"] = packed.chosen_rewards
        out["rejected_gt_rewards"] = packed.rejected_rewards
        out["sample_index"] = packed.sample_indices
        return out

    def normalizer(self, micro_batches: Sequence[ModelBatch], global_examples: int) -> Tensor:
        """Pairs in the global batch (per-pair losses are averaged over the global batch)."""
        return torch.tensor(float(global_examples), device=batch_device(micro_batches))

    def loss_fn(self, normalizer: Tensor) -> LossFn:
        """The micro-batch loss with ``normalizer`` bound."""
        return functools.partial(
            dpo_loss_and_metrics, self.config, normalizer, reward_mean=self.reward_mean
        )

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Means over the global batch's pairs, and ``rewards_margin``."""
        pairs = max(sums["pairs"], 1.0)
        out = {k: sums[k] / pairs for k in ("loss", "preference_loss", "sft_loss", "acc")}
        out["rewards_chosen_mean"] = sums["rewards_chosen"] / pairs
        out["rewards_rejected_mean"] = sums["rewards_rejected"] / pairs
        out["rewards_margin"] = out["rewards_chosen_mean"] - out["rewards_rejected_mean"]
        return out
