"""PNG charts of a run from its ``metrics.jsonl``: loss, accuracy, reward margin, KL, lr.

One chart per quantity present in the metrics (training as a line, validation as markers), plus
``overview.png`` with all of them. The reward margin is ``rewards_margin`` when logged, else
``rewards_chosen_mean - rewards_rejected_mean``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align_cli.sinks import read_metrics

__all__ = ["CHARTS", "Chart", "plot_run", "series"]

Row = dict[str, Any]


def _metric(name: str) -> Callable[[Row], float | None]:
    def get(row: Row) -> float | None:
        value = row.get(name)
        return None if value is None else float(value)

    return get


def _margin(row: Row) -> float | None:
    if row.get("rewards_margin") is not None:
        return float(row["rewards_margin"])
    chosen, rejected = row.get("rewards_chosen_mean"), row.get("rewards_rejected_mean")
    if chosen is None or rejected is None:
        return None
    return float(chosen) - float(rejected)


@dataclass(frozen=True)
class Chart:
    """One chart.

    Attributes:
        file: PNG file name inside ``plots/``.
        title: Chart title.
        ylabel: Y-axis label.
        value: How to read the plotted value from a metrics row (None where absent).
        log_scale: Use a logarithmic y axis.
    """

    file: str
    title: str
    ylabel: str
    value: Callable[[Row], float | None]
    log_scale: bool = False


CHARTS: tuple[Chart, ...] = (
    Chart("loss.png", "Loss", "loss", _metric("loss")),
    Chart("accuracy.png", "Preference accuracy", "acc", _metric("acc")),
    Chart("reward_margin.png", "Reward margin (chosen - rejected)", "margin", _margin),
    Chart("kl.png", "KL estimate", "kl", _metric("kl")),
    Chart("lr.png", "Learning rate", "lr", _metric("lr")),
)


def series(rows: list[Row], chart: Chart, split: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``chart`` for ``split`` (rows without the value are skipped)."""
    steps, values = [], []
    for row in rows:
        if row.get("split") != split:
            continue
        value = chart.value(row)
        if value is not None:
            steps.append(int(row["step"]))
            values.append(value)
    return steps, values


def _draw(ax: Any, rows: list[Row], chart: Chart) -> bool:
    drawn = False
    for split, style in (
        ("train", {"linewidth": 1.2}),
        ("val", {"marker": "o", "linestyle": "--"}),
    ):
        steps, values = series(rows, chart, split)
        if steps:
            ax.plot(steps, values, label=split, **style)
            drawn = True
    ax.set_title(chart.title)
    ax.set_xlabel("step")
    ax.set_ylabel(chart.ylabel)
    ax.grid(True, alpha=0.3)
    if chart.log_scale:
        ax.set_yscale("log")
    if drawn:
        ax.legend()
    return drawn


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the charts of a run.

    Args:
        run_dir: The run directory (with ``metrics.jsonl``).
        out_dir: Where to write; default ``RUN_DIR/plots``.

    Returns:
        The PNG files written (charts without data are not written).

    Raises:
        FileNotFoundError: The run directory has no ``metrics.jsonl``.
        ImportError: matplotlib is not installed (``pip install 'align-cli[plot]'``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl to plot")
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'align-cli[plot]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    present = [c for c in CHARTS if series(rows, c, "train")[0] or series(rows, c, "val")[0]]
    for chart in present:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, rows, chart)
        fig.tight_layout()
        fig.savefig(out / chart.file, dpi=100)
        plt.close(fig)
        written.append(out / chart.file)
    if present:
        cols = min(3, len(present))
        nrows = -(-len(present) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        for ax, chart in zip(axes.flat, present, strict=False):
            _draw(ax, rows, chart)
        for ax in list(axes.flat)[len(present) :]:
            ax.axis("off")
        fig.suptitle(run_dir.name)
        fig.tight_layout()
        fig.savefig(out / "overview.png", dpi=100)
        plt.close(fig)
        written.append(out / "overview.png")
    return written
