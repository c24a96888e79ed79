"""Configuration of the trainer loop (``trainer.<algorithm>`` in the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ReferenceConfig", "TrainerConfig"]


@dataclass
class TrainerConfig:
    """``trainer.<algorithm>``: NeMo-Aligner's names and defaults, plus run-safety settings.

    Attributes:
        max_epochs: Passes over the training data.
        max_steps: Stop after this many optimizer steps; -1 means ``max_epochs`` decides.
        val_check_interval: Validate every N steps (int), or every fraction of an epoch (float
            in (0, 1]); 0 disables validation.
        save_interval: Save a checkpoint every N steps; 0 disables periodic saves (a final
            checkpoint is still written).
        limit_train_batches: Fraction (float) or number (int) of global batches per epoch.
        limit_val_batches: Fraction (float) or number (int) of validation batches.
        gradient_clip_val: Clip the global gradient norm to this; <= 0 disables clipping.
        max_time: Wall-clock limit ``DD:HH:MM:SS``; when reached the run validates, saves and
            exits cleanly. None means no limit.
        nonfinite: What a NaN/inf loss or gradient does: ``stop`` the run naming the step, or
            ``skip`` the step (no update) and count it.
        keep_last_checkpoints: How many periodic checkpoints to keep.
        log_every_n_steps: Metrics cadence.
        val_at_start: Also validate before the first step (step 0, or the resumed step), so
            the logged curves start from the initial policy.
    """

    max_epochs: int = 1
    max_steps: int = -1
    val_check_interval: float = 0.1
    save_interval: int = 100
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    gradient_clip_val: float = 1.0
    max_time: str | None = None
    nonfinite: Literal["stop", "skip"] = "stop"
    keep_last_checkpoints: int = 2
    log_every_n_steps: int = 1
    val_at_start: bool = False


@dataclass
class ReferenceConfig:
    """``model.reference``: how the reference policy is evaluated.

    Attributes:
        strategy: ``swap`` (weights in pinned CPU memory, copied in around the reference
            forward), ``adapters`` (LoRA disabled), ``precompute`` (one pass before training,
            cached on disk), ``model`` (a second frozen model) or ``auto``: ``adapters`` with
            LoRA, else ``precompute`` for offline DPO/KTO. The resolved strategy is logged;
            an explicit strategy that cannot apply is an error, never a silent fallback.
        cache_dir: Where ``precompute`` keeps its cache; None uses the run directory.
        update_alpha: TR-DPO (Gorbatovski et al., 2024): every ``update_interval`` optimizer
            steps the reference becomes ``α·policy + (1−α)·reference`` (α = 1: a hard copy, the
            paper's τ-update; a small α every step: its soft update). None keeps the reference
            frozen. Needs a reference that holds weights (``swap`` or ``model``; ``auto``
            resolves to ``swap``); the updated reference is saved with each checkpoint.
        update_interval: Steps between reference updates (τ).
    """

    strategy: Literal["auto", "swap", "adapters", "precompute", "model"] = "auto"
    cache_dir: str | None = None
    update_alpha: float | None = None
    update_interval: int = 1

    def __post_init__(self) -> None:
        if self.update_alpha is not None and not 0.0 < self.update_alpha <= 1.0:
            raise ValueError(f"model.reference.update_alpha: {self.update_alpha} not in (0, 1]")
        if self.update_interval < 1:
            raise ValueError(
                f"model.reference.update_interval must be >= 1, got {self.update_interval}"
            )

    @property
    def updated(self) -> bool:
        """Whether the reference changes during training (TR-DPO)."""
        return self.update_alpha is not None
