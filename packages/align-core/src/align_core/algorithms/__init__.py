"""Training algorithms: each one module with its config, batch building and step."""

from align_core.algorithms.dpo import DPOConfig, PreferenceLoss
from align_core.algorithms.kto import KTOConfig
from align_core.algorithms.sft import SFTConfig

__all__ = ["DPOConfig", "KTOConfig", "PreferenceLoss", "SFTConfig"]
