"""Metrics plumbing: the `MetricsSink` protocol, an in-memory sink, and peak-memory readings.

Metrics are computed on every rank where they are needed (reductions over data parallel, the
last pipeline stage holds the losses) and handed to sinks on global rank 0 only. The CLI supplies
its own sinks (JSONL, TensorBoard, a progress bar); `InMemorySink` keeps everything in lists for
tests and notebooks.

Names follow NeMo-Aligner: ``loss``, ``preference_loss``, ``sft_loss``, ``acc``,
``rewards_chosen_mean``, ``rewards_rejected_mean``, ``rewards_margin``, ``kl`` (KTO),
``grad_norm``, ``lr``, ``consumed_samples``, ``epoch``, plus ``tokens_per_s``, ``step_time`` and
``peak_memory`` (bytes). Splits are ``"train"`` and ``"val"`` (loggers usually prefix
``train/`` and ``val/``).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from align_core.trainer.run import RunPlan, RunResult

__all__ = ["InMemorySink", "MetricsSink", "Split", "announce", "peak_memory_bytes", "shows_status"]

Split = Literal["train", "val"]


@runtime_checkable
class MetricsSink(Protocol):
    """Receives metrics on global rank 0.

    Implementations must not raise on unknown metric names; new metrics may appear.
    """

    def start(self, plan: RunPlan) -> None:
        """Called once before the first step with the resolved run plan."""
        ...

    def log(self, split: Split, step: int, metrics: Mapping[str, float]) -> None:
        """Called after each logged training step (``split="train"``) and each validation.

        Args:
            split: ``"train"`` or ``"val"``.
            step: Optimizer steps completed when the metrics were taken (1-based for train).
            metrics: Name to value (plain Python floats).
        """
        ...

    def finish(self, result: RunResult) -> None:
        """Called once when the run ends, however it ends (also after a SIGTERM)."""
        ...


@dataclass
class InMemorySink:
    """A sink that keeps every record, for tests and notebooks.

    Attributes:
        plan: The plan given to `start`.
        train: ``(step, metrics)`` per logged training step.
        val: ``(step, metrics)`` per validation.
        result: The run result given to `finish`.
    """

    plan: RunPlan | None = None
    train: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    val: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    result: RunResult | None = None

    def start(self, plan: RunPlan) -> None:
        """Keep the plan."""
        self.plan = plan

    def log(self, split: Split, step: int, metrics: Mapping[str, float]) -> None:
        """Append a record."""
        (self.train if split == "train" else self.val).append((step, dict(metrics)))

    def finish(self, result: RunResult) -> None:
        """Keep the result."""
        self.result = result

    def series(self, name: str, split: Split = "train") -> list[float]:
        """All values of one metric, in step order."""
        rows = self.train if split == "train" else self.val
        return [m[name] for _, m in rows if name in m]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far.

    On CUDA: ``torch.cuda.max_memory_allocated`` of ``device``. On CPU: the peak resident set
    size of the process (``ru_maxrss``), which includes the Python interpreter and libraries.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def shows_status(sinks: Sequence[object]) -> bool:
    """Whether a sink shows status lines (one with a ``status(text)`` method, e.g. a progress bar).

    Sinks need not have one; without any, the run's slow phases stay silent (``--quiet``).
    """
    return any(callable(getattr(sink, "status", None)) for sink in sinks)


def announce(sinks: Sequence[object], text: str) -> None:
    """Hand ``text`` (a slow phase about to start) to every sink with a ``status`` method."""
    for sink in sinks:
        status = getattr(sink, "status", None)
        if callable(status):
            status(text)
