"""Training algorithms: each one module with its config, batch building and step.

An algorithm step (`AlgorithmStep`) tells the trainer how to collate examples into model
batches, which global normaliser its loss uses, the micro-batch loss itself (computed by
`align_losses`) and how to turn reduced metric sums into the logged metrics. The contract is
`align_core.algorithms.contract`; every algorithm's facts (config class, step factory, data kind,
reference need, CLI section, preset, help) are in `align_core.algorithms.registry`.
"""

from typing import TYPE_CHECKING

from align_core._lazy import lazy_exports

if TYPE_CHECKING:
    from align_core.algorithms._common import segment_sums
    from align_core.algorithms._packed import packed_forward
    from align_core.algorithms.contract import IGNORE_INDEX, AlgorithmStep, ModelBatch
    from align_core.algorithms.dpo import DPOConfig, DPOStep, PreferenceLoss
    from align_core.algorithms.kto import KTOConfig, KTOStep
    from align_core.algorithms.registry import REGISTRY, AlgorithmSpec, get_algorithm
    from align_core.algorithms.sft import SFTConfig, SFTStep

_EXPORTS = {
    "segment_sums": "align_core.algorithms._common",
    "packed_forward": "align_core.algorithms._packed",
    "IGNORE_INDEX": "align_core.algorithms.contract",
    "AlgorithmStep": "align_core.algorithms.contract",
    "ModelBatch": "align_core.algorithms.contract",
    "DPOConfig": "align_core.algorithms.dpo",
    "DPOStep": "align_core.algorithms.dpo",
    "PreferenceLoss": "align_core.algorithms.dpo",
    "KTOConfig": "align_core.algorithms.kto",
    "KTOStep": "align_core.algorithms.kto",
    "REGISTRY": "align_core.algorithms.registry",
    "AlgorithmSpec": "align_core.algorithms.registry",
    "get_algorithm": "align_core.algorithms.registry",
    "SFTConfig": "align_core.algorithms.sft",
    "SFTStep": "align_core.algorithms.sft",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "IGNORE_INDEX",
    "REGISTRY",
    "AlgorithmSpec",
    "AlgorithmStep",
    "DPOConfig",
    "DPOStep",
    "KTOConfig",
    "KTOStep",
    "ModelBatch",
    "PreferenceLoss",
    "SFTConfig",
    "SFTStep",
    "get_algorithm",
    "packed_forward",
    "segment_sums",
]
