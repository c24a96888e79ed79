"""Status lines before slow phases, and the resume-length note (no model, no workers)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from align_cli.commands import run as run_command
from align_cli.launch import LaunchOptions
from align_cli.progress import ProgressSink
from align_core.trainer.metrics import InMemorySink, announce, shows_status
from align_core.trainer.run import RunPlan


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, force_terminal=False), out


def _plan(**changes: object) -> RunPlan:
    values: dict[str, object] = dict(
        algorithm="dpo",
        run_dir="runs/dpo-x",
        world_size=1,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        data_parallel_size=1,
        micro_batch_size=2,
        global_batch_size=4,
        accumulation_steps=2,
        train_samples=40,
        val_samples=0,
        steps_per_epoch=10,
        max_steps=10,
        start_step=0,
        val_check_interval=0,
        save_interval=0,
        reference_strategy="precompute",
        resumed_from=None,
    )
    values.update(changes)
    return RunPlan(**values)  # type: ignore[arg-type]


def test_status_lines_reach_the_progress_sink_only() -> None:
    console, out = _console()
    sinks = [InMemorySink(), ProgressSink(console)]
    assert shows_status(sinks) and not shows_status(sinks[:1])
    announce(sinks, "precomputing reference log-probs (cache: runs/x/reference_cache)")
    announce(sinks[:1], "never shown")  # --quiet: no progress sink, nothing printed
    assert (
        out.getvalue() == "precomputing reference log-probs (cache: runs/x/reference_cache) ...\n"
    )


def test_the_resume_note_is_printed_after_the_plan() -> None:
    console, out = _console()
    note = "run length changed on resume: the original run planned 10 steps, this one 15"
    ProgressSink(console).start(
        _plan(
            max_steps=15,
            start_step=10,
            resumed_from="runs/dpo-x/checkpoints/step_000010",
            resume_note=note,
        )
    )
    lines = out.getvalue().splitlines()
    assert "resumed at step 10" in lines[0] and lines[-1] == note
    console, out = _console()
    ProgressSink(console).start(_plan())
    assert "run length" not in out.getvalue()


@pytest.mark.parametrize("quiet", [False, True])
def test_starting_workers_is_announced(
    quiet: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_command, "launcher", lambda: None)
    monkeypatch.setattr(run_command, "write_run_dir", lambda *a, **k: None)
    monkeypatch.setattr(run_command, "run_torchrun", lambda how, run_dir, quiet: 0)
    console, out = _console()
    options = run_command.RunOptions(command="dpo", quiet=quiet)
    how = LaunchOptions(nproc_per_node=2)
    status = run_command.launch(tmp_path / "run", None, options, how, console)  # type: ignore[arg-type]
    assert status == 0
    expected = "" if quiet else "starting 2 workers (torchrun, 2 per node) ...\n"
    assert out.getvalue() == expected
