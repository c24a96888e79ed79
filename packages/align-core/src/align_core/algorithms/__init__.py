"""Training algorithms: each one module with its config, batch building and step.

An algorithm step (`AlgorithmStep`) tells the trainer how to collate examples into model
batches, which global normaliser its loss uses, the micro-batch loss itself (computed by
`align_losses`) and how to turn reduced metric sums into the logged metrics. The contract is
`align_core.algorithms.contract`; every algorithm's facts (config class, step factory, data kind,
reference need, CLI section, preset, help) are in `align_core.algorithms.registry`.
"""

from align_core.algorithms._common import segment_sums
from align_core.algorithms._packed import packed_forward
from align_core.algorithms.contract import IGNORE_INDEX, AlgorithmStep, ModelBatch
from align_core.algorithms.dpo import DPOConfig, DPOStep, PreferenceLoss
from align_core.algorithms.kto import KTOConfig, KTOStep
from align_core.algorithms.registry import REGISTRY, AlgorithmSpec, get_algorithm
from align_core.algorithms.sft import SFTConfig, SFTStep

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
