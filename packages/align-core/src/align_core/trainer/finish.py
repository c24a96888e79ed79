"""The end of a training session, shared by every trainer built on `Trainer`.

`fit_and_finish` runs the loop, reports a non-finite stop to the sinks before re-raising,
exports the final policy when the run completed, and hands the `RunResult` to the sinks.
`export_final_nemo` writes ``run_dir/final.nemo`` from the restored (or fresh) model's
architecture and tokenizer; the SPIN trainer, whose loop spans several `Trainer` objects,
uses it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align_core.trainer.loop import NonFiniteError, Trainer
from align_core.trainer.metrics import MetricsSink
from align_core.trainer.run import RunResult

if TYPE_CHECKING:
    from align_core.trainer.build import ModelSource

__all__ = ["export_final_nemo", "fit_and_finish", "trainer_result"]

FINAL_NEMO = "final.nemo"


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


def trainer_result(
    trainer: Trainer, run_dir: str | Path, reason: str, nemo_path: str | None, strategy: str
) -> RunResult:
    """The `RunResult` of a run whose counters and metrics live in ``trainer``."""
    return RunResult(
        run_dir=str(run_dir),
        stop_reason=reason,  # type: ignore[arg-type]
        steps=trainer.state.step,
        consumed_samples=trainer.state.consumed_samples,
        skipped_steps=trainer.state.skipped_steps,
        last_train_metrics=dict(trainer.last_train_metrics),
        last_val_metrics=dict(trainer.last_val_metrics),
        checkpoint=trainer.last_checkpoint,
        nemo_path=nemo_path,
        reference_strategy=strategy,
    )


def fit_and_finish(
    trainer: Trainer,
    sinks: Sequence[MetricsSink],
    *,
    run_dir: str | Path,
    reference_strategy: str,
    export: Callable[[], str] | None,
) -> RunResult:
    """Run ``trainer.fit()``, export on completion, and finish the sinks with the result.

    Args:
        trainer: The assembled loop (resumed already, if resuming).
        sinks: This rank's metrics sinks (empty off the main rank); each gets ``finish``.
        run_dir: The run directory (reported in the result).
        reference_strategy: The resolved reference strategy (reported in the result).
        export: Writes the final `.nemo` and returns its path (collective); None: no export.
            Called only when the run completed.

    Returns:
        The `RunResult` the sinks received.

    Raises:
        NonFiniteError: A NaN/inf loss or gradient with ``nonfinite="stop"``; the sinks first
            receive a result with ``stop_reason="nonfinite"``.
    """
    try:
        reason = trainer.fit()
    except NonFiniteError:
        failed = trainer_result(trainer, run_dir, "nonfinite", None, reference_strategy)
        for sink in sinks:
            sink.finish(failed)
        raise
    nemo_path = export() if export is not None and reason == "completed" else None
    out = trainer_result(trainer, run_dir, reason, nemo_path, reference_strategy)
    for sink in sinks:
        sink.finish(out)
    return out
