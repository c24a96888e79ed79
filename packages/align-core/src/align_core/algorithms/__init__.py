"""Training algorithms: each one module with its config, batch building and step.

An algorithm step (`AlgorithmStep`) tells the trainer how to collate examples into model
batches, which global normaliser its loss uses, the micro-batch loss itself (computed by
`align_losses`) and how to turn reduced metric sums into the logged metrics.
"""

from align_core.algorithms._common import AlgorithmStep, ModelBatch, segment_sums
from align_core.algorithms._packed import packed_forward
from align_core.algorithms.dpo import DPOConfig, DPOStep, PreferenceLoss
from align_core.algorithms.kto import KTOConfig, KTOStep
from align_core.algorithms.sft import SFTConfig, SFTStep

__all__ = [
    "AlgorithmStep",
    "DPOConfig",
    "DPOStep",
    "KTOConfig",
    "KTOStep",
    "ModelBatch",
    "PreferenceLoss",
    "SFTConfig",
    "SFTStep",
    "packed_forward",
    "segment_sums",
]
