"""SFT: negative log-likelihood of the response tokens."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

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
from align_data.batches import SFTBatch
from align_data.collate import CollateConfig, collate_sft
from align_data.packing import collate_packed_sft
from align_data.tokenize import SFTExample

__all__ = ["SFTConfig", "SFTStep", "sft_loss_and_metrics", "sft_model_batch"]


@dataclass
class SFTConfig:
    """``model.sft``: how the supervised loss is reduced.

    Attributes:
        loss_reduction: ``token_mean`` divides the summed token NLL of the global batch by the
            number of response tokens in the global batch (every token weighs the same);
            ``sequence_mean`` averages each sequence's mean token NLL over the global batch
            (every example weighs the same).
    """

    loss_reduction: Literal["token_mean", "sequence_mean"] = "token_mean"


def sft_model_batch(batch: SFTBatch) -> ModelBatch:
    """The model batch of a collated SFT batch."""
    out = padded_model_batch(batch.input_ids, batch.labels, batch.position_ids, batch.lengths)
    out["sample_index"] = batch.sample_indices
    return out


def sft_loss_and_metrics(
    cfg: SFTConfig, normalizer: Tensor, batch: Mapping[str, Tensor], token_logps: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch (the `align_core.schedule` loss contract).

    Args:
        cfg: SFT settings.
        normalizer: Response tokens (``token_mean``) or examples (``sequence_mean``) in the
            global batch.
        batch: The model batch (``segment_ids``, ``seq_token_counts``).
        token_logps: ``[R, S]`` policy token log-probs.

    Returns:
        ``Σ NLL / normalizer`` and detached metric sums (``loss``, ``tokens``, ``examples``).
    """
    counts = batch["seq_token_counts"]
    n = counts.numel()
    nll = -segment_sums(upcast(token_logps), batch["segment_ids"], n)
    if cfg.loss_reduction == "sequence_mean":
        nll = nll / counts.to(nll.dtype).clamp(min=1.0)
    total = nll.sum()
    metrics = {
        "loss": total.detach(),
        "tokens": counts.float().sum(),
        "examples": torch.tensor(float(n), device=nll.device),
    }
    return total / normalizer, metrics


@dataclass(frozen=True)
class SFTStep:
    """SFT as an `align_core.algorithms.AlgorithmStep`.

    Attributes:
        config: SFT settings.
        group: Data-parallel group (token counts are summed over it for ``token_mean``).
        name: ``"sft"``.
        needs_reference: False.
        ref_shape: 0.
    """

    config: SFTConfig
    group: dist.ProcessGroup | None = field(default=None, compare=False)
    name: str = "sft"
    needs_reference: bool = False
    ref_shape: int = 0

    def build_micro_batch(
        self, examples: Sequence[SFTExample], collate: CollateConfig
    ) -> ModelBatch:
        """Collate ``examples`` into one padded model batch."""
        return sft_model_batch(collate_sft(examples, collate))

    def build_packed_micro_batch(
        self, examples: Sequence[SFTExample], collate: CollateConfig, capacity: int
    ) -> ModelBatch:
        """Pack ``examples`` into rows of ``capacity`` positions (one model batch)."""
        packed = collate_packed_sft(examples, collate, capacity=capacity)
        out = packed_model_batch(packed)
        out["sample_index"] = packed.sample_indices
        return out

    def normalizer(self, micro_batches: Sequence[ModelBatch], global_examples: int) -> Tensor:
        """Response tokens of the global batch (``token_mean``) or its examples."""
        if self.config.loss_reduction == "sequence_mean":
            return torch.tensor(float(global_examples), device=batch_device(micro_batches))
        tokens = torch.stack([mb["seq_token_counts"].float().sum() for mb in micro_batches]).sum()
        if self.group is not None and self.group.size() > 1:
            dist.all_reduce(tokens, group=self.group)
        return tokens.clamp(min=1.0)

    def loss_fn(self, normalizer: Tensor) -> LossFn:
        """The micro-batch loss with ``normalizer`` bound."""
        return functools.partial(sft_loss_and_metrics, self.config, normalizer)

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """``loss`` (= ``sft_loss``) under the configured reduction."""
        if self.config.loss_reduction == "sequence_mean":
            loss = sums["loss"] / max(sums["examples"], 1.0)
        else:
            loss = sums["loss"] / max(sums["tokens"], 1.0)
        return {"loss": loss, "sft_loss": loss}
