"""The worker entry point: one rank of a run, reading the resolved run directory.

``python -m align_cli.worker RUN_DIR`` is what ``align run`` starts through torchrun; a single
process, or a rank under Slurm ``srun``/an outer torchrun, calls `run_worker` directly. The worker
composes the saved ``config.yaml`` (no new overrides), converts it to the typed run
configuration and calls the entry point of its algorithm (`align_core.trainer.train`,
`align_core.trainer.spin.train_spin`, `align_kd.train_kd`; the teacher pass and ``align
generate`` have their own, see `align_cli.commands.kd` and `align_cli.commands.generate`), with
the metric sinks on global rank 0.

Exit status: 0 when the run completed or reached its wall-clock limit, 143 after SIGTERM (a
checkpoint was saved; ``align run <algo> --resume`` continues), 1 on a non-finite loss or
gradient, 2 for bad data or configuration (one line naming the file:line or the key).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from align_cli.errors import UsageError
from align_cli.launch import launcher, prepare_slurm_env, world_rank
from align_cli.rundir import CONFIG_FILE, read_run_info

if TYPE_CHECKING:
    from rich.console import Console

    from align_cli.config import Composed
    from align_cli.config.schema import TreeAlgorithm

__all__ = ["EXIT_CODES", "main", "make_sinks", "quiet_library_warnings", "run_worker", "train"]

EXIT_CODES = {"completed": 0, "max_time": 0, "sigterm": 143, "sigint": 130, "nonfinite": 1}
"""Exit status by `align_core.trainer.RunResult.stop_reason`."""


def make_sinks(
    composed: Composed, run_dir: Path, *, quiet: bool, console: Console | None = None
) -> list[Any]:
    """The rank-0 sinks: metrics.jsonl, summary.json, TensorBoard, progress bar, plots."""
    from align_cli.progress import ProgressSink
    from align_cli.sinks import JsonlSink, PlotSink, SummarySink, TensorBoardSink

    exp = composed.tree.exp_manager
    sinks: list[Any] = [JsonlSink(run_dir), SummarySink(run_dir)]
    if exp.create_tensorboard_logger and TensorBoardSink.available():
        sinks.append(TensorBoardSink(run_dir / "tb"))
    if not quiet:
        sinks.append(ProgressSink(console, title=_title(run_dir)))
    if exp.create_plots:
        warn = console.print if console is not None else print
        sinks.append(PlotSink(run_dir, warn=warn))
    return sinks


def _title(run_dir: Path) -> str:
    try:
        return f"align run {read_run_info(run_dir).command}"
    except UsageError:
        return "align run"


def quiet_library_warnings() -> None:
    """Hide import-time warnings about optional CUDA libraries (Apex, TE, the CUDA runtime).

    They say nothing a user can act on when training on CPU or without those libraries;
    ``ALIGN_DEBUG=1`` keeps them.
    """
    if os.environ.get("ALIGN_DEBUG") == "1":
        return
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron(\.|$)")
        warnings.filterwarnings("ignore", category=category, module=r"torch\.distributed")


def run_worker(
    run_dir: Path,
    *,
    composed: Composed | None = None,
    quiet: bool = False,
    console: Console | None = None,
) -> int:
    """Train this rank's share of the run in ``run_dir``; return the exit status.

    Args:
        run_dir: A run directory written by ``align run`` (``config.yaml`` and ``run.json``).
        composed: The already composed configuration (skips re-reading ``config.yaml``).
        quiet: No progress bar or summary table.
        console: Console of the progress bar (rank 0).
    """
    from omegaconf import DictConfig, OmegaConf

    from align_cli.config import compose, to_run_config
    from align_cli.config.restore import base_model_for
    from align_cli.preflight import with_batch_hint

    quiet_library_warnings()
    if launcher() == "slurm":
        prepare_slurm_env()
    info = read_run_info(run_dir)
    if composed is None:
        saved = OmegaConf.load(run_dir / CONFIG_FILE)
        assert isinstance(saved, DictConfig)  # `align run` writes the tree as a mapping
        # run.json names the tree `align run` composed; compose rejects any other name.
        composed = compose(cast("TreeAlgorithm", info.algorithm), base=[saved])
    if composed.algorithm == "kd_teacher":
        from align_cli.commands.kd import run_teacher_worker

        return run_teacher_worker(run_dir, composed, quiet=quiet, console=console)
    if composed.algorithm == "generate":
        from align_cli.commands.generate import run_generate_worker

        return run_generate_worker(run_dir, composed, quiet=quiet, console=console)
    run = to_run_config(
        composed.algorithm,
        composed.tree,
        str(run_dir),
        base_model=base_model_for(composed.tree),
    )
    rank = world_rank()
    sinks = make_sinks(composed, run_dir, quiet=quiet, console=console) if rank == 0 else []

    try:
        result = train(composed.algorithm, run, sinks)
    except ValueError as exc:
        hinted = with_batch_hint(exc, run, _world_size())
        if hinted is exc:
            raise
        raise hinted from exc
    return EXIT_CODES.get(result.stop_reason, 1)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def train(algorithm: str, run: Any, sinks: list[Any]) -> Any:
    """Call the training entry point of ``algorithm`` on this rank; return its `RunResult`."""
    if algorithm == "spin":
        from align_core.trainer.spin import train_spin

        return train_spin(run, sinks)
    if algorithm == "kd":
        from align_kd import train_kd

        return train_kd(run, sinks)
    from align_core.trainer import train as train_preference

    return train_preference(run, sinks)


def main(argv: list[str] | None = None) -> int:
    """``python -m align_cli.worker RUN_DIR [--quiet]``."""
    from align_cli.main import report_errors

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m align_cli.worker RUN_DIR [--quiet]", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    quiet = "--quiet" in args[1:]
    return report_errors(lambda: run_worker(run_dir, quiet=quiet), rank=world_rank())


if __name__ == "__main__":
    sys.exit(main())
