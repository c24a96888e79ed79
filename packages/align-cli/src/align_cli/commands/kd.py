"""``align kd teacher``: the teacher's top-k over a run's data, written as shards (resumable).

The tree is `align_cli.config.trees.kd_teacher_tree` (``output``, ``top_k``, ``dtype``, ...,
``model.data.*`` as in the student's ``align run kd``). The output directory is the "run
directory": it holds ``config.yaml`` and ``run.json`` (what torchrun workers read) next to the
``train/`` and ``validation/`` stores. Running the same command again continues every part of
the stores where it stopped and computes nothing when they are complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import OmegaConf
from rich.console import Console

from align_cli.config import compose, load_tree, to_run_config, to_yaml
from align_cli.errors import UsageError
from align_cli.progress import make_console

if TYPE_CHECKING:
    from align_cli.commands.run import RunOptions
    from align_cli.config import Composed

__all__ = ["StoreStats", "execute_teacher", "run_teacher_worker", "store_stats"]

TREE = "kd_teacher"
COMMAND = "kd-teacher"


@dataclass(frozen=True)
class StoreStats:
    """What a teacher store directory holds on disk.

    Attributes:
        samples: Committed samples (all parts).
        positions: Input positions (tokens) of those samples.
        bytes: Size of every file under the directory.
    """

    samples: int
    positions: int
    bytes: int

    @property
    def bytes_per_token(self) -> float:
        """``bytes / positions``."""
        return self.bytes / max(self.positions, 1)


def store_stats(directory: Path) -> StoreStats:
    """Samples, positions and bytes of the stores under ``directory`` (all its parts).

    The positions come from each store's ``index.bin`` (align-data's commit log: one int64
    triple ``(shard, first_position, num_positions)`` per committed sample).
    """
    samples = positions = 0
    for index in directory.rglob("index.bin"):
        entries = np.fromfile(index, dtype=np.int64)
        entries = entries[: len(entries) // 3 * 3].reshape(-1, 3)
        samples += len(entries)
        positions += int(entries[:, 2].sum())
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return StoreStats(samples, positions, size)


def _compose(options: RunOptions) -> Composed:
    layers: list[Any] = []
    if options.config_file:
        layers.append(load_tree(TREE, options.config_file))
    if options.restore:
        layers.append(
            OmegaConf.create({"pretrained_checkpoint": {"restore_from_path": options.restore}})
        )
    return compose(TREE, list(options.overrides), base=layers)


def execute_teacher(options: RunOptions, console: Console | None = None) -> int:
    """Run ``align kd teacher``; return the exit status.

    Raises:
        ConfigError: A bad key or value, or no teacher (``--restore``).
        UsageError: No ``output=DIR``.
    """
    from align_cli.commands.run import launch, launch_options

    console = console or make_console()
    composed = _compose(options)
    for note in composed.notes:
        console.print(f"note: {note}", highlight=False)
    if options.show_config:
        console.print(to_yaml(composed.config), highlight=False, markup=False)
        return 0
    if composed.tree.output is None:
        raise UsageError(
            "output=DIR is required: the directory of the teacher stores (a rerun resumes it)"
        )
    out = Path(composed.tree.output)
    to_run_config(TREE, composed.tree, str(out))  # every value checked before starting
    if options.dry_run:
        raise UsageError("--dry-run is not available for `align kd teacher`")
    return launch(out, composed, options, launch_options(options, composed.tree), console)


def run_teacher_worker(
    out: Path, composed: Composed, *, quiet: bool = False, console: Console | None = None
) -> int:
    """One rank of the teacher pass; global rank 0 prints what was written."""
    from align_cli.launch import world_rank
    from align_cli.worker import quiet_library_warnings
    from align_kd import run_teacher

    quiet_library_warnings()
    config = to_run_config(TREE, composed.tree, str(out))
    results = run_teacher(config)
    if world_rank() != 0 or quiet:
        return 0
    console = console or make_console()
    for split, result in results.items():
        stats = store_stats(out / split)
        done = (
            f"computed {result.samples_computed:,} samples ({result.positions_computed:,} "
            f"tokens, {result.positions_per_second:,.0f} tokens/s)"
            if result.samples_computed
            else "already complete, nothing computed"
        )
        console.print(
            f"{split}: {result.num_examples:,} examples; {done}; store {stats.samples:,} samples, "
            f"{stats.positions:,} tokens, {_size(stats.bytes)} = "
            f"{stats.bytes_per_token:,.0f} bytes/token",
            highlight=False,
        )
    console.print(f"teacher top-k (k={config.output.top_k}): {out}", highlight=False)
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"
