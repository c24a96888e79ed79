"""KTO: unpaired desirable/undesirable examples against a KL baseline from mismatched pairs.

One module of the common algorithm shape: `KTOConfig`, the micro-batch layout, and `KTOStep`.
A micro-batch of ``b`` examples runs ``2b`` sequences through the model: the ``b`` samples
(``prompt_i + completion_i``) and the ``b`` KL samples (``prompt_i + completion_{(i+1) mod b}``,
built by align-data's collate inside each rank's micro-batch, so ``b = 1`` is an error there).
Sequence ``i < b`` is sample ``i``; sequence ``b + i`` its KL sample.

The loss is `align_losses.kto_loss` with the data-parallel group, so the KL baseline z₀ is the
mean over the KL samples of every data-parallel rank's micro-batch (then clamped at 0 and
detached); per-example losses are summed and divided by the examples in the global batch.

Metrics: ``loss``, ``kl`` (the z₀ the loss used, averaged over micro-batches),
``rewards_chosen_mean`` / ``rewards_rejected_mean`` (means of ``β·(π − π_ref)`` over the
desirable / undesirable examples of the global batch; 0 when a group is empty),
``rewards_margin``, and ``acc``: the fraction of examples on the right side of the baseline
(desirable ``π − π_ref > z₀``, undesirable ``< z₀``; 0 at step 0, where every log-ratio is
exactly z₀ = 0), the unpaired counterpart of DPO's preference accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
from align_core.schedule import LossFn
from align_data.batches import KTOBatch
from align_data.collate import CollateConfig, collate_kto
from align_data.tokenize import UnpairedExample

__all__ = ["KTOConfig", "KTOStep", "kto_loss_and_metrics", "kto_model_batch"]


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
        if self.log_prob_forward_micro_batch_size is not None and (
            self.log_prob_forward_micro_batch_size < 2
        ):
            raise ValueError("model.kto.log_prob_forward_micro_batch_size must be >= 2")


def kto_model_batch(batch: KTOBatch) -> ModelBatch:
    """The model batch of a collated KTO batch (samples first, then their KL samples)."""
    out = padded_model_batch(batch.input_ids, batch.labels, batch.position_ids, batch.lengths)
    out["desirable"] = batch.desirable
    out["sample_index"] = batch.sample_indices
    return out


def kto_loss_and_metrics(
    cfg: KTOConfig,
    group: dist.ProcessGroup | None,
    normalizer: Tensor,
    batch: Mapping[str, Tensor],
    token_logps: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch (the `align_core.schedule` loss contract).

    Args:
        cfg: KTO settings.
        group: Data-parallel group the KL baseline is averaged over (None: this rank only).
        normalizer: Examples in the global batch.
        batch: The model batch (``segment_ids``, ``seq_token_counts``, ``ref_logps``,
            ``desirable``).
        token_logps: ``[R, S]`` policy token log-probs.

    Returns:
        ``Σ losses / normalizer`` and detached metric sums (``loss``, ``kl``, ``acc``,
        ``rewards_chosen``, ``rewards_rejected``, ``chosen``, ``rejected``, ``examples``,
        ``micro_batches``).
    """
    from align_losses import kto_loss

    counts = batch["seq_token_counts"]
    n = counts.numel()
    b = n // 2
    policy = segment_sums(upcast(token_logps), batch["segment_ids"], n)
    ref = batch["ref_logps"].to(policy.dtype)
    if cfg.preference_average_log_probs:
        denom = counts.to(policy.dtype).clamp(min=1.0)
        policy, ref = policy / denom, ref / denom
    desirable = batch["desirable"].bool()
    out = kto_loss(
        policy[:b],
        ref[:b],
        desirable,
        policy[b:],
        ref[b:],
        beta=cfg.ref_policy_kl_penalty,
        desirable_weight=cfg.desirable_loss_weight,
        undesirable_weight=cfg.undesirable_loss_weight,
        group=group,
    )
    loss = out.losses.sum() / normalizer
    one = torch.ones((), device=policy.device)
    log_ratio = (policy[:b] - ref[:b]).detach()
    right_side = torch.where(desirable, log_ratio > out.kl, log_ratio < out.kl)
    metrics = {
        "loss": out.losses.detach().sum(),
        "kl": out.kl.detach().reshape(()),
        "acc": right_side.float().sum(),
        "rewards_chosen": torch.where(desirable, out.rewards, 0.0).sum(),
        "rewards_rejected": torch.where(desirable, 0.0, out.rewards).sum(),
        "chosen": desirable.float().sum(),
        "rejected": (~desirable).float().sum(),
        "examples": one * b,
        "micro_batches": one,
    }
    return loss, metrics


@dataclass(frozen=True)
class KTOStep:
    """KTO as an `align_core.algorithms.AlgorithmStep`.

    Attributes:
        config: KTO settings.
        group: Data-parallel group of the KL baseline.
        name: ``"kto"``.
        needs_reference: True.
        ref_shape: 2 (the sample's and its KL sample's reference log-prob sums).
    """

    config: KTOConfig
    group: dist.ProcessGroup | None = field(default=None, compare=False)
    name: str = "kto"
    needs_reference: bool = True
    ref_shape: int = 2

    def build_micro_batch(
        self, examples: Sequence[UnpairedExample], collate: CollateConfig
    ) -> ModelBatch:
        """Collate ``examples`` with their mismatched KL samples into one model batch."""
        return kto_model_batch(collate_kto(examples, collate))

    def build_packed_micro_batch(
        self, examples: Sequence[UnpairedExample], collate: CollateConfig, capacity: int
    ) -> ModelBatch:
        """Not supported: KTO's KL samples are built per micro-batch, unpacked."""
        raise ValueError("model.data.packing is supported for dpo and sft, not kto")

    def normalizer(self, micro_batches: Sequence[ModelBatch], global_examples: int) -> Tensor:
        """Examples in the global batch."""
        return torch.tensor(float(global_examples), device=batch_device(micro_batches))

    def loss_fn(self, normalizer: Tensor) -> LossFn:
        """The micro-batch loss with ``normalizer`` bound."""
        return functools.partial(kto_loss_and_metrics, self.config, self.group, normalizer)

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Means over the global batch; ``kl`` averaged over micro-batches (and DP ranks)."""
        chosen = sums["rewards_chosen"] / sums["chosen"] if sums["chosen"] else 0.0
        rejected = sums["rewards_rejected"] / sums["rejected"] if sums["rejected"] else 0.0
        examples = max(sums["examples"], 1.0)
        return {
            "loss": sums["loss"] / examples,
            "kl": sums["kl"] / max(sums["micro_batches"], 1.0),
            "acc": sums["acc"] / examples,
            "rewards_chosen_mean": chosen,
            "rewards_rejected_mean": rejected,
            "rewards_margin": chosen - rejected,
        }
