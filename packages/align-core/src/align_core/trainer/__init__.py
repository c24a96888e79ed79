"""The trainer loop shared by every algorithm."""

from align_core.trainer.config import ReferenceConfig, TrainerConfig

__all__ = ["ReferenceConfig", "TrainerConfig"]
