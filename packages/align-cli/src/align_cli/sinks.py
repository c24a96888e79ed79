"""Metric sinks of a run (global rank 0 only): ``metrics.jsonl``, TensorBoard events, plots.

Each implements align-core's `MetricsSink` protocol (``start(plan)``, ``log(split, step,
metrics)``, ``finish(result)``). A failing optional sink (TensorBoard, plots) prints one line and
never stops training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align_cli.rundir import METRICS_FILE, SUMMARY_FILE, atomic_write

if TYPE_CHECKING:
    from align_core.trainer import RunPlan, RunResult

__all__ = ["JsonlSink", "PlotSink", "SummarySink", "TensorBoardSink", "read_metrics"]


def _clean(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class JsonlSink:
    """Appends one JSON object per logged step to ``RUN_DIR/metrics.jsonl``.

    Rows are ``{"split": "train"|"val", "step": int, "time": unix seconds, <name>: value}``
    (non-finite values are written as null). On resume, rows beyond the resumed step (logged
    after the last checkpoint of the interrupted run) are dropped, so the file describes one
    consistent trajectory.

    Args:
        run_dir: The run directory.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._file: Any = None

    def start(self, plan: RunPlan) -> None:
        """Open the file, dropping rows past ``plan.start_step``."""
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= plan.start_step
            ]
            atomic_write(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        """Append one row and flush it."""
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        row: dict[str, Any] = {"split": split, "step": int(step), "time": round(time.time(), 3)}
        row.update({name: _clean(value) for name, value in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def finish(self, result: RunResult) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl`` (a missing file gives no rows).

    Raises:
        ValueError: A row that is not JSON, naming file and line.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
    return rows


class TensorBoardSink:
    """Writes scalars ``train/<name>`` and ``val/<name>`` to TensorBoard event files.

    Uses tensorboard's own event writer (no TensorFlow, no torch.utils.tensorboard).

    Args:
        log_dir: Directory of the event files (``RUN_DIR/tb``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        # tensorboard's protobuf modules build their classes at import time and ship no stubs.
        from tensorboard.compat.proto.event_pb2 import Event  # pyright: ignore[reportAttributeAccessIssue]
        from tensorboard.compat.proto.summary_pb2 import Summary  # pyright: ignore[reportAttributeAccessIssue]
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event = Event
        self._summary = Summary
        self._writer = EventFileWriter(str(log_dir))

    @staticmethod
    def available() -> bool:
        """Whether tensorboard is installed."""
        import importlib.util

        return importlib.util.find_spec("tensorboard") is not None

    def start(self, plan: RunPlan) -> None:
        """Mark a (re)start so TensorBoard drops older events past ``plan.start_step``.

        TensorBoard purges every event at or after a ``SessionLog.START``'s step, so the marker
        carries the first step this run trains (``start_step + 1``).
        """
        # A protobuf class built at import time (no stubs), as in __init__.
        from tensorboard.compat.proto.event_pb2 import SessionLog  # pyright: ignore[reportAttributeAccessIssue]

        start = SessionLog(status=SessionLog.START)
        self._writer.add_event(
            self._event(wall_time=time.time(), step=int(plan.start_step) + 1, session_log=start)
        )

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        """Write one event with every finite metric."""
        values = [
            self._summary.Value(tag=f"{split}/{name}", simple_value=float(value))
            for name, value in metrics.items()
            if math.isfinite(float(value))
        ]
        event = self._event(
            wall_time=time.time(), step=int(step), summary=self._summary(value=values)
        )
        self._writer.add_event(event)

    def finish(self, result: RunResult) -> None:
        """Flush and close the event file."""
        self._writer.close()


class SummarySink:
    """Writes ``RUN_DIR/summary.json``: the plan and how the run ended.

    Args:
        run_dir: The run directory.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / SUMMARY_FILE
        self._plan: dict[str, Any] = {}
        self._started = time.time()

    def start(self, plan: RunPlan) -> None:
        """Keep the plan."""
        self._plan = dataclasses.asdict(plan)
        self._started = time.time()

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        """Nothing per step."""

    def finish(self, result: RunResult) -> None:
        """Write the summary file."""
        payload = {
            "plan": self._plan,
            "result": dataclasses.asdict(result),
            "wall_time_s": round(time.time() - self._started, 3),
        }
        atomic_write(self.path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


class PlotSink:
    """Draws the charts of ``align plot`` into ``RUN_DIR/plots`` when the run ends.

    Args:
        run_dir: The run directory.
        warn: Where to report a failure (matplotlib missing, ...); training is never stopped.
    """

    def __init__(self, run_dir: str | Path, warn: Callable[[str], None] = print) -> None:
        self.run_dir = Path(run_dir)
        self._warn = warn

    def start(self, plan: RunPlan) -> None:
        """Nothing to do before the first step."""

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        """Nothing per step."""

    def finish(self, result: RunResult) -> None:
        """Write the PNG charts."""
        from align_cli.plot import plot_run

        try:
            plot_run(self.run_dir)
        except Exception as exc:  # plots are a convenience; the run itself has succeeded
            self._warn(f"plots not written: {exc}")
