"""metrics.jsonl, TensorBoard events and the PNG charts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from align_cli.plot import CHARTS, plot_run, series
from align_cli.sinks import JsonlSink, TensorBoardSink, read_metrics


@dataclass(frozen=True)
class _Plan:  # the fields of align_core.trainer.RunPlan the sinks read
    start_step: int


def _write_metrics(run_dir: Path, steps: int = 6) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        rows.append(
            {
                "split": "train",
                "step": step,
                "loss": 0.7 - 0.05 * step,
                "acc": 0.5 + 0.05 * step,
                "rewards_chosen_mean": 0.1 * step,
                "rewards_rejected_mean": -0.1 * step,
                "lr": 1e-3,
            }
        )
        if step % 3 == 0:
            rows.append({"split": "val", "step": step, "loss": 0.6, "acc": 0.5 + 0.1 * step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_plot_writes_charts_from_metrics(tmp_path: Path) -> None:
    _write_metrics(tmp_path)
    written = plot_run(tmp_path)
    names = {p.name for p in written}
    # No "kl" in the metrics: that chart is left out.
    assert names == {"loss.png", "accuracy.png", "reward_margin.png", "lr.png", "overview.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 1000


def test_reward_margin_is_derived_from_chosen_and_rejected(tmp_path: Path) -> None:
    rows = _write_metrics(tmp_path)
    margin = next(c for c in CHARTS if c.file == "reward_margin.png")
    steps, values = series(rows, margin, "train")
    assert steps == [1, 2, 3, 4, 5, 6]
    assert values == pytest.approx([0.2 * s for s in steps])
    acc = next(c for c in CHARTS if c.file == "accuracy.png")
    assert series(rows, acc, "val") == ([3, 6], pytest.approx([0.8, 1.1]))


def test_plot_without_metrics_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl"):
        plot_run(tmp_path)


def test_jsonl_sink_appends_and_drops_rows_past_the_resumed_step(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    sink.start(_Plan(start_step=0))
    for step in range(1, 6):
        sink.log("train", step, {"loss": 1.0 / step, "acc": float("nan")})
    sink.finish(None)  # type: ignore[arg-type]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["acc"] is None  # non-finite values are written as null
    # Resumed from the checkpoint at step 3: steps 4 and 5 will be trained again.
    sink = JsonlSink(tmp_path)
    sink.start(_Plan(start_step=3))
    sink.log("train", 4, {"loss": 0.2})
    sink.finish(None)  # type: ignore[arg-type]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == 0.2


@pytest.mark.skipif(not TensorBoardSink.available(), reason="tensorboard is not installed")
def test_tensorboard_events_hold_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path)
    sink.start(_Plan(start_step=0))
    sink.log("train", 1, {"loss": 0.5, "acc": 0.25})
    sink.log("train", 2, {"loss": 0.25, "acc": float("inf")})
    sink.log("val", 2, {"loss": 0.75})
    sink.finish(None)  # type: ignore[arg-type]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("train/acc")] == [(1, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(2, 0.75)]


@pytest.mark.skipif(not TensorBoardSink.available(), reason="tensorboard is not installed")
def test_tensorboard_resume_drops_the_steps_trained_again(tmp_path: Path) -> None:
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardSink(tmp_path)
    first.start(_Plan(start_step=0))
    for step in (1, 2, 3):
        first.log("train", step, {"loss": float(step)})
    first.finish(None)  # type: ignore[arg-type]
    time.sleep(1.1)  # event files are named by the second they were opened
    resumed = TensorBoardSink(tmp_path)
    resumed.start(_Plan(start_step=1))  # the checkpoint was at step 1
    resumed.log("train", 2, {"loss": 20.0})
    resumed.finish(None)  # type: ignore[arg-type]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 20.0)]


def test_readme_lists_the_run_directory_and_the_data_formats() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    listing = readme.split("## Run directory", 1)[1].split("```")[1]
    names = [line.split()[0] for line in listing.splitlines() if line and not line[0].isspace()]
    for name in ("config.yaml", "metrics.jsonl", "plots/", "data/", "reference_cache/"):
        assert name in names
    # kl.png is written only where a kl metric is logged (KTO), as plot_run above shows.
    plots = listing.split("plots/", 1)[1].split("data/", 1)[0]
    assert "kl.png for KTO only" in " ".join(plots.split())
    formats = readme.split("## Data formats", 1)[1].split("\n## ", 1)[0]
    assert "(../align-data/README.md#formats)" in formats
    assert "`prompt`, `chosen`, `rejected`" in formats
    assert "`prompt`, `completion`, `label`: `true`" in formats and "`false`" in formats
    assert "`messages`" in formats
    assert (Path(__file__).parents[2] / "align-data" / "README.md").read_text().count("## Formats")
