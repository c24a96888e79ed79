"""`align_core.trainer.finish`: the end of a session (fit, export on completion, sinks)."""

from dataclasses import dataclass, field

import pytest

from align_core.trainer import InMemorySink, NonFiniteError, TrainerState
from align_core.trainer.finish import FinalExports, fit_and_finish


@dataclass
class FakeTrainer:
    """What `fit_and_finish` reads from a `Trainer`: fit(), counters, metrics, checkpoint."""

    outcome: str | Exception
    state: TrainerState = field(default_factory=lambda: TrainerState(7, 56, 1))
    last_train_metrics: dict = field(default_factory=lambda: {"loss": 0.5})
    last_val_metrics: dict = field(default_factory=dict)
    last_checkpoint: str | None = "run/checkpoints/step_000007"

    @property
    def run_step(self) -> int:
        return self.state.step

    @property
    def run_samples(self) -> int:
        return self.state.consumed_samples

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped_steps

    def fit(self) -> str:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_a_completed_run_is_exported_once_and_reported():
    sink, exports = InMemorySink(), []
    out = fit_and_finish(
        FakeTrainer("completed"),
        [sink],
        run_dir="run",
        reference_strategy="swap",
        export=lambda: exports.append(1) or FinalExports(nemo="run/final.nemo"),
    )
    assert exports == [1]
    assert sink.result == out
    assert (out.stop_reason, out.steps, out.consumed_samples, out.skipped_steps) == (
        "completed", 7, 56, 1
    )  # fmt: skip
    assert out.nemo_path == "run/final.nemo" and out.checkpoint.endswith("step_000007")
    assert out.last_train_metrics == {"loss": 0.5} and out.reference_strategy == "swap"


@pytest.mark.parametrize("reason", ["sigterm", "max_time"])
def test_an_interrupted_run_exports_nothing(reason):
    sink = InMemorySink()

    def export() -> str:
        raise AssertionError("exported an interrupted run")

    out = fit_and_finish(
        FakeTrainer(reason), [sink], run_dir="run", reference_strategy="none", export=export
    )
    assert out.stop_reason == reason and out.nemo_path is None and sink.result == out


def test_a_nonfinite_stop_reaches_the_sinks_then_raises():
    sink = InMemorySink()
    with pytest.raises(NonFiniteError, match="step 3"):
        fit_and_finish(
            FakeTrainer(NonFiniteError(3, float("nan"), 1.0)),
            [sink],
            run_dir="run",
            reference_strategy="none",
            export=None,
        )
    assert sink.result.stop_reason == "nonfinite" and sink.result.nemo_path is None
