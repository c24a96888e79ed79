"""The public algorithm contract: what the trainer needs from an algorithm step.

Every algorithm run by the shared training loop (the DPO family, KTO, SFT; SPIN's and
distillation's steps have the same shape) provides an object satisfying `AlgorithmStep`. A
*model batch* (`ModelBatch`) is a ``dict[str, Tensor]`` holding the forward inputs
(``tokens``, ``labels``, ``position_ids``, optionally ``attention_mask``) and what the loss
needs (``segment_ids``, ``seq_token_counts``, ``sample_index``, ``ref_logps``, algorithm
fields); see `align_core.algorithms._common` for the layout. Which step an algorithm name
builds, and the rest of its facts, is `align_core.algorithms.registry`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from align_core.schedule import LossFn
from align_data.collate import CollateConfig

__all__ = ["IGNORE_INDEX", "AlgorithmStep", "ModelBatch", "StatefulStep"]

IGNORE_INDEX = -100
"""The label of a position whose prediction is not scored."""

ModelBatch = dict[str, Tensor]
"""One micro-batch as the forward and the loss see it (see the module docstring)."""


class AlgorithmStep(Protocol):
    """What the trainer needs from an algorithm (DPO family, KTO, SFT).

    ``name``, ``needs_reference`` and ``ref_shape`` are read-only: a step may provide them as
    plain or frozen-dataclass attributes, class attributes or properties.
    """

    @property
    def name(self) -> str:
        """``"dpo"``, ``"kto"`` or ``"sft"``."""
        ...

    @property
    def needs_reference(self) -> bool:
        """Whether the loss uses reference log-probs."""
        ...

    @property
    def ref_shape(self) -> int:
        """Per-example width of the reference log-probs.

        2 for a pair, 2 for a KTO sample and its KL sample, 0 without a reference.
        """
        ...

    def build_micro_batch(self, examples: Sequence[Any], collate: CollateConfig) -> ModelBatch:
        """Collate tokenized examples (align-data) into one padded model batch."""
        ...

    def build_packed_micro_batch(
        self, examples: Sequence[Any], collate: CollateConfig, capacity: int
    ) -> ModelBatch:
        """Pack tokenized examples into rows of ``capacity`` positions (one model batch)."""
        ...

    def normalizer(self, micro_batches: Sequence[ModelBatch], global_examples: int) -> Tensor:
        """The global-batch normaliser of the loss: examples, or tokens for token-mean losses.

        Runs on every rank; may all-reduce (token counts) over the data-parallel group. The
        micro-batches are on the model's device (the trainer moves them first) and so is the
        result (`batch_device`), as NCCL requires of what it reduces.
        """
        ...

    def loss_fn(self, normalizer: Tensor) -> LossFn:
        """``(batch, token_logps) -> (loss, metric sums)`` with ``loss = Σ losses / normalizer``."""
        ...

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Turn metric sums reduced over the global batch into the logged metrics."""
        ...


@runtime_checkable
class StatefulStep(Protocol):
    """A step that carries state across optimizer steps (``bco_pair``'s reward mean).

    The trainer saves ``state_dict()`` with each checkpoint (``trainer_state["algorithm"]``)
    and hands it back to ``load_state_dict`` on resume. Plain values only.
    """

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        ...
