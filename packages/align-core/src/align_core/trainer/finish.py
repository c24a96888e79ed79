"""The end of a training session, shared by every trainer built on `Trainer`.

`fit_and_finish` runs the loop, reports a non-finite stop to the sinks before re-raising,
exports the final policy when the run completed, and hands the `RunResult` to the sinks.
`export_final` writes ``run_dir/final.nemo`` and/or ``run_dir/final_hf/`` (a Hugging Face
directory) from the restored (or fresh) model's architecture and tokenizer, as
`final_formats` decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from align_core.trainer.loop import NonFiniteError
from align_core.trainer.metrics import MetricsSink
from align_core.trainer.run import RunResult

if TYPE_CHECKING:
    from align_core.trainer.build import ModelSource

__all__ = [
    "FinalExports",
    "Fit",
    "export_final",
    "export_final_nemo",
    "final_formats",
    "fit_and_finish",
    "trainer_result",
]

FINAL_NEMO = "final.nemo"
FINAL_HF = "final_hf"


class FinalExports(NamedTuple):
    """What the end of a run wrote: paths as strings, None for a format not written."""

    nemo: str | None = None
    hf: str | None = None


def final_formats(
    export_nemo: bool | None, export_hf: bool | None, source: ModelSource
) -> tuple[bool, bool]:
    """Which final exports a run writes: ``(nemo, hf)``.

    An unset choice (None) follows the model's origin: a run restored from a Hugging Face
    directory writes ``final_hf/``, any other run ``final.nemo``.
    """
    from_hf = source.checkpoint_format == "hf"
    nemo = (not from_hf) if export_nemo is None else export_nemo
    hf = from_hf if export_hf is None else export_hf
    return nemo, hf


def export_final_nemo(model: Any, run_dir: str | Path, source: ModelSource) -> str:
    """Write ``model`` to ``run_dir/final.nemo`` (collective: every rank calls it).

    Args:
        model: This rank's model chunk (DDP-wrapped or not), LoRA adapters already merged.
        run_dir: The run directory.
        source: Where the run's model came from: its architecture and tokenizer are written.

    Returns:
        The path written, as a string.
    """
    from align_core.nemo import save_nemo

    path = Path(run_dir) / FINAL_NEMO
    return str(save_nemo(model, path, source.model, tokenizer=source.tokenizer_spec))


def export_final_hf(model: Any, run_dir: str | Path, source: ModelSource) -> str:
    """Write ``model`` to ``run_dir/final_hf/``, a Hugging Face directory (collective).

    A model restored from a Hugging Face directory keeps its ``config.json`` (architecture and
    values), dtype and tokenizer files; any other is written as ``LlamaForCausalLM`` (Qwen2/3
    for their attention variants) with the ``tokenizer.json`` of a Hugging Face tokenizer.

    Args:
        model: This rank's model chunk (DDP-wrapped or not), LoRA adapters already merged.
        run_dir: The run directory.
        source: Where the run's model came from.

    Returns:
        The directory written, as a string.
    """
    from align_core.hf import open_hf, save_hf

    path = Path(run_dir) / FINAL_HF
    if source.checkpoint_format == "hf":
        with open_hf(source.nemo_path) as origin:  # type: ignore[arg-type]
            return str(save_hf(model, path, source.model, source=origin))
    return str(save_hf(model, path, source.model, tokenizer=source.tokenizer_spec))


def export_final(
    model: Any, run_dir: str | Path, source: ModelSource, *, nemo: bool, hf: bool
) -> FinalExports:
    """Write the final policy in the chosen formats (collective: every rank calls it)."""
    return FinalExports(
        nemo=export_final_nemo(model, run_dir, source) if nemo else None,
        hf=export_final_hf(model, run_dir, source) if hf else None,
    )


class Fit(Protocol):
    """What `fit_and_finish` runs and reads: a `Trainer`, or a run's stages of trainers."""

    @property
    def run_step(self) -> int:
        """Steps done on the run's scale."""
        ...

    @property
    def run_samples(self) -> int:
        """Training examples consumed on the run's scale."""
        ...

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was skipped."""
        ...

    last_train_metrics: dict[str, float]
    last_val_metrics: dict[str, float]
    last_checkpoint: str | None

    def fit(self) -> str:
        """Train; returns the stop reason."""
        ...


def trainer_result(
    trainer: Fit,
    run_dir: str | Path,
    reason: str,
    exports: FinalExports,
    strategy: str,
) -> RunResult:
    """The `RunResult` of a run whose counters and metrics live in ``trainer``."""
    return RunResult(
        run_dir=str(run_dir),
        stop_reason=reason,  # type: ignore[arg-type]
        steps=trainer.run_step,
        consumed_samples=trainer.run_samples,
        skipped_steps=trainer.skipped_steps,
        last_train_metrics=dict(trainer.last_train_metrics),
        last_val_metrics=dict(trainer.last_val_metrics),
        checkpoint=trainer.last_checkpoint,
        nemo_path=exports.nemo,
        hf_path=exports.hf,
        reference_strategy=strategy,
    )


def fit_and_finish(
    trainer: Fit,
    sinks: Sequence[MetricsSink],
    *,
    run_dir: str | Path,
    reference_strategy: str,
    export: Callable[[], FinalExports] | None,
) -> RunResult:
    """Run ``trainer.fit()``, export on completion, and finish the sinks with the result.

    Args:
        trainer: The assembled loop (resumed already, if resuming).
        sinks: This rank's metrics sinks (empty off the main rank); each gets ``finish``.
        run_dir: The run directory (reported in the result).
        reference_strategy: The resolved reference strategy (reported in the result).
        export: Writes the final model (`export_final`) and returns what it wrote
            (collective); None: no export. Called only when the run completed.

    Returns:
        The `RunResult` the sinks received.

    Raises:
        NonFiniteError: A NaN/inf loss or gradient with ``nonfinite="stop"``; the sinks first
            receive a result with ``stop_reason="nonfinite"``.
    """
    try:
        reason = trainer.fit()
    except NonFiniteError:
        failed = trainer_result(trainer, run_dir, "nonfinite", FinalExports(), reference_strategy)
        for sink in sinks:
            sink.finish(failed)
        raise
    exports = export() if export is not None and reason == "completed" else FinalExports()
    out = trainer_result(trainer, run_dir, reason, exports, reference_strategy)
    for sink in sinks:
        sink.finish(out)
    return out
