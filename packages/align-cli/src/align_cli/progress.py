"""The live progress bar and the end-of-run summary table (global rank 0 only)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    from align_core.trainer import RunPlan, RunResult

__all__ = ["ProgressSink", "format_metric", "make_console"]

_SUMMARY_METRICS = (
    "iteration",
    "loss",
    "preference_loss",
    "kd_loss",
    "sft_loss",
    "top1_agreement",
    "acc",
    "rewards_chosen_mean",
    "rewards_rejected_mean",
    "rewards_actual_mean",
    "rewards_generated_mean",
    "rewards_margin",
    "generated_length_mean",
    "generation_tokens_per_s",
    "kl",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "step_time",
    "peak_memory",
)
_STOP_WORDS = {
    "completed": "completed",
    "max_time": "stopped at the wall-clock limit (trainer.<algo>.max_time)",
    "sigterm": "stopped by SIGTERM (checkpoint saved)",
    "sigint": "stopped by Ctrl-C (checkpoint saved)",
    "nonfinite": "stopped on a non-finite loss or gradient",
}


def make_console() -> Console:
    """A console for run output: 120 columns when stdout is not a terminal (logs, CI)."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120)
    return console


def format_metric(name: str, value: float | None) -> str:
    """A metric value for people: memory in MiB/GiB, rates with no decimals, else 4 digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if name == "peak_memory":
        mib = value / 2**20
        return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"
    if name in ("tokens_per_s", "generation_tokens_per_s"):
        return f"{value:,.0f}"
    if name == "iteration":
        return f"{value:.0f}"
    if name.endswith("_length_mean"):
        return f"{value:.1f}"
    if name == "step_time":
        return f"{value:.3f} s"
    if name == "lr":
        return f"{value:.3g}"
    return f"{value:.4f}"


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressSink:
    """Shows step, loss, acc, tokens/s and ETA while training, and a summary table at the end.

    On a terminal the bar is live (rich); otherwise (logs, CI) one line is printed about every
    5% of the run and after each validation.

    Args:
        console: Where to draw; default a new rich console on stdout.
        title: Shown before the bar (e.g. ``dpo``).
    """

    def __init__(self, console: Console | None = None, title: str = "train") -> None:
        self.console = console or make_console()
        self.title = title
        self._progress: Progress | None = None
        self._task: Any = None
        self._plan: RunPlan | None = None
        self._t0 = time.monotonic()
        self._first_step = 0
        self._last_line_step = 0
        self._first_val: dict[str, float] = {}
        self._last_val: dict[str, float] = {}
        self._last_train: dict[str, float] = {}

    def status(self, text: str) -> None:
        """Print one line saying what slow phase starts now (before the bar)."""
        self.console.print(f"{text} ...", highlight=False, markup=False)

    def start(self, plan: RunPlan) -> None:
        """Print the plan and start the bar."""
        self._plan = plan
        self._t0 = time.monotonic()
        self._first_step = plan.start_step
        self._last_line_step = plan.start_step
        layout = (
            f"TP={plan.tensor_model_parallel_size} PP={plan.pipeline_model_parallel_size} "
            f"DP={plan.data_parallel_size}"
        )
        resumed = f", resumed at step {plan.start_step}" if plan.resumed_from else ""
        role = "opponent" if plan.algorithm == "spin" else "reference"
        reference = (
            f", {role} {plan.reference_strategy}" if plan.reference_strategy != "none" else ""
        )
        self.console.print(
            f"[bold]{self.title}[/]: {plan.max_steps} steps of {plan.global_batch_size} "
            f"({plan.micro_batch_size} x {plan.accumulation_steps} accumulation x "
            f"{plan.data_parallel_size} DP), {plan.train_samples} training examples, "
            f"{layout}{reference}{resumed}"
        )
        self.console.print(f"run directory: {plan.run_dir}")
        note = getattr(plan, "resume_note", None)
        if note:
            self.console.print(note, highlight=False)
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                self.title, total=plan.max_steps, completed=plan.start_step, stats=""
            )

    def _stats(self, metrics: Mapping[str, float]) -> str:
        parts = []
        for name, label in (
            ("iteration", "iter"),
            ("loss", "loss"),
            ("acc", "acc"),
            ("top1_agreement", "top-1"),
            ("generated_length_mean", "gen len"),
            ("tokens_per_s", "tok/s"),
        ):
            if name in metrics:
                parts.append(f"{label} {format_metric(name, metrics[name])}")
        return "  ".join(parts)

    def _eta(self, step: int) -> str:
        if self._plan is None or step <= self._first_step:
            return "?"
        rate = (time.monotonic() - self._t0) / (step - self._first_step)
        return _duration(rate * (self._plan.max_steps - step))

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        """Advance the bar (train) or print the validation results (val)."""
        if split == "val":
            if not self._first_val:
                self._first_val = dict(metrics)
            self._last_val = dict(metrics)
            text = "  ".join(
                f"{name} {format_metric(name, metrics[name])}"
                for name in (
                    "loss",
                    "acc",
                    "rewards_margin",
                    "kl",
                    "kd_loss",
                    "top1_agreement",
                    "generated_length_mean",
                )
                if name in metrics
            )
            self.console.print(f"validation at step {step}: {text}")
            return
        self._last_train = dict(metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=self._stats(metrics))
            return
        total = self._plan.max_steps if self._plan else step
        every = max(1, total // 20)
        if step - self._last_line_step >= every or step == total:
            self._last_line_step = step
            self.console.print(
                f"step {step}/{total}  {self._stats(metrics)}  ETA {self._eta(step)}",
                highlight=False,
            )

    def finish(self, result: RunResult) -> None:
        """Stop the bar and print the summary table."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        table = Table(
            title=f"{self.title}: {_STOP_WORDS.get(result.stop_reason, result.stop_reason)}"
        )
        table.add_column("")
        table.add_column("train (last step)", justify="right")
        table.add_column("validation (first)", justify="right")
        table.add_column("validation (last)", justify="right")
        train = result.last_train_metrics or self._last_train
        last_val = result.last_val_metrics or self._last_val
        for name in _SUMMARY_METRICS:
            if name in train or name in last_val:
                table.add_row(
                    name,
                    format_metric(name, train.get(name)),
                    format_metric(name, self._first_val.get(name)),
                    format_metric(name, last_val.get(name)),
                )
        self.console.print(table)
        elapsed = time.monotonic() - self._t0
        lines = [
            f"steps {result.steps} ({result.consumed_samples} examples) in {_duration(elapsed)}",
        ]
        if result.skipped_steps:
            lines.append(f"skipped steps (non-finite): {result.skipped_steps}")
        if result.checkpoint:
            lines.append(f"checkpoint: {result.checkpoint}")
        for path in (result.nemo_path, result.hf_path):
            if path:
                lines.append(f"model: {path}")
        lines.append(f"run directory: {result.run_dir}")
        for line in lines:
            self.console.print(line, highlight=False)
