"""``align run {dpo,ipo,rpo,kto,sft,spin,kd}``: compose, check, lay out the run directory, launch.

Layers of the configuration, later ones winning: the dataclass defaults; the command's preset
(``ipo``/``rpo``); the built-in demo preset when neither a model nor data is given; ``--config
FILE``; ``--restore``; the ``key=value`` overrides. ``--resume`` starts instead from the saved
``config.yaml`` of the run being continued (overrides still apply, e.g. a larger
``trainer.dpo.max_steps``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from align_cli.config import Composed, compose, load_tree, to_run_config, to_yaml
from align_cli.config.presets import DEMO, VARIANTS, algorithm_of, check_variant
from align_cli.config.restore import base_model_for
from align_cli.errors import UsageError, expected_failure
from align_cli.launch import (
    DEFAULT_MASTER_PORT,
    LaunchOptions,
    free_port,
    launcher,
    run_torchrun,
    world_rank,
)
from align_cli.progress import make_console
from align_cli.rundir import (
    CONFIG_FILE,
    RUN_FILE,
    find_last_run,
    new_run_dir,
    read_run_info,
    run_started,
    write_run_info,
)
from align_core.algorithms.registry import REGISTRY

__all__ = [
    "Prepared",
    "RunOptions",
    "execute",
    "launch",
    "launch_options",
    "prepare",
    "write_run_dir",
]


@dataclass(frozen=True)
class RunOptions:
    """What was typed after ``align run``.

    Attributes:
        command: ``dpo``, ``ipo``, ``rpo``, ``kto``, ``sft``, ``spin`` or ``kd``.
        overrides: ``key=value`` arguments.
        restore: ``--restore``: the initial ``.nemo``.
        resume: ``--resume``: continue the last run (or ``exp_manager.explicit_log_dir``).
        dry_run: ``--dry-run``: check configuration and data, print the plan, train nothing.
        config_file: ``--config``: a YAML file of (part of) the tree.
        show_config: ``--show-config``: print the composed tree and exit.
        quiet: ``--quiet``: no progress bar or summary.
        nproc_per_node: ``--nproc-per-node`` (None: ``trainer.devices``, else 1).
        nnodes: ``--nnodes`` (None: ``trainer.num_nodes``).
        node_rank: ``--node-rank``.
        master_addr: ``--master-addr``.
        master_port: ``--master-port`` (None: a free port when on one node, else 29500).
        argv: The full command line, recorded in ``run.json``.
    """

    command: str
    overrides: tuple[str, ...] = ()
    restore: str | None = None
    resume: bool = False
    dry_run: bool = False
    config_file: str | None = None
    show_config: bool = False
    quiet: bool = False
    nproc_per_node: int | None = None
    nnodes: int | None = None
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prepared:
    """A composed, checked run, ready to launch.

    Attributes:
        composed: The configuration tree.
        run_dir: The run directory.
        run: The typed run configuration (align-core's `RunConfig` or `SPINRunConfig`,
            align-kd's `KDRunConfig`); None with ``--show-config``.
        launch: How many processes, and where they meet.
        demo: Whether the built-in demo preset applies (no model, no data).
        resumed: Whether this continues an existing run directory.
    """

    composed: Composed
    run_dir: Path
    run: Any
    launch: LaunchOptions
    demo: bool
    resumed: bool


def _layers(options: RunOptions, algorithm: str, demo: bool) -> list[Any]:
    layers: list[Any] = []
    if options.command in VARIANTS:
        layers.append(OmegaConf.create(VARIANTS[options.command]))
    if demo:
        layers.append(OmegaConf.create(DEMO[algorithm]))
    if options.config_file:
        layers.append(load_tree(algorithm, options.config_file))  # type: ignore[arg-type]
    if options.restore:
        layers.append(
            OmegaConf.create({"pretrained_checkpoint": {"restore_from_path": options.restore}})
        )
    return layers


def _is_demo(composed: Composed) -> bool:
    from align_cli.config.trees import data_files

    tree = composed.tree
    return tree.pretrained_checkpoint.restore_from_path is None and not data_files(
        composed.algorithm, tree
    )


def _set(config: DictConfig, key: str, value: Any) -> None:
    OmegaConf.update(config, key, value, force_add=False)


def _resume_dir(options: RunOptions, composed: Composed) -> Path:
    exp = composed.tree.exp_manager
    if exp.explicit_log_dir:
        run_dir = Path(exp.explicit_log_dir)
        if not (run_dir / CONFIG_FILE).is_file():
            raise UsageError(f"--resume: {run_dir} is not a run directory (no {CONFIG_FILE})")
    else:
        run_dir = find_last_run(exp.exp_dir, options.command)
    info = read_run_info(run_dir)
    if info.command != options.command:
        raise UsageError(
            f"--resume: {run_dir} is an `align run {info.command}` run, not "
            f"`align run {options.command}`"
        )
    return run_dir


def _check_restore_unchanged(restore: str | None, saved: Any, run_dir: Path) -> None:
    """``--restore`` with ``--resume`` must name the model the run started from.

    Raises:
        UsageError: It names another one (the key, the run's value and the new one).
    """
    if restore is None:
        return
    key = "pretrained_checkpoint.restore_from_path"
    before = OmegaConf.select(saved, key, default=None)
    if before is not None and Path(before).resolve() == Path(restore).resolve():
        return
    raise UsageError(
        f"--resume: {key} is {before!r} in {run_dir}, --restore gives {restore!r} (a resumed "
        "run continues from its own checkpoint: drop --restore, or start a new run with it)"
    )


def launch_options(options: RunOptions, tree: Any) -> LaunchOptions:
    """How many processes, and where they meet: the options, else ``trainer.devices``/``num_nodes``.

    Raises:
        UsageError: A count below 1 or a node rank out of range.
    """
    nproc = options.nproc_per_node or tree.trainer.devices or 1
    nnodes = options.nnodes or tree.trainer.num_nodes or 1
    for name, value in (("--nproc-per-node", nproc), ("--nnodes", nnodes)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if not 0 <= options.node_rank < nnodes:
        raise UsageError(f"--node-rank {options.node_rank} is not in [0, {nnodes})")
    port = options.master_port
    if port is None:
        # One node: any free port (other jobs on the machine may hold torchrun's 29500).
        port = free_port() if nnodes == 1 else DEFAULT_MASTER_PORT
    return LaunchOptions(
        nproc_per_node=nproc,
        nnodes=nnodes,
        node_rank=options.node_rank,
        master_addr=options.master_addr,
        master_port=port,
    )


def prepare(options: RunOptions) -> Prepared:
    """Compose and check everything; decide the run directory and the launch.

    Nothing is written to disk.

    Raises:
        ConfigError: A bad key or value (naming it).
        UsageError: Options that cannot work together.
    """
    algorithm = algorithm_of(options.command)
    overrides = list(options.overrides)
    composed = compose(algorithm, overrides, base=_layers(options, algorithm, demo=False))  # type: ignore[arg-type]
    resumed = False
    if options.resume:
        run_dir = _resume_dir(options, composed)
        saved = OmegaConf.load(run_dir / CONFIG_FILE)
        _check_restore_unchanged(options.restore, saved, run_dir)
        composed = compose(algorithm, overrides, base=[saved])  # type: ignore[arg-type]
        resumed = True
        demo = _is_demo(composed)
    else:
        demo = _is_demo(composed)
        if demo:
            composed = compose(algorithm, overrides, base=_layers(options, algorithm, demo=True))  # type: ignore[arg-type]
        exp = composed.tree.exp_manager
        if exp.explicit_log_dir:
            run_dir = Path(exp.explicit_log_dir)
            resumed = (run_dir / CONFIG_FILE).is_file() and exp.resume_if_exists
        else:
            launch_nodes = options.nnodes or composed.tree.trainer.num_nodes or 1
            if launch_nodes > 1 and launcher() is None and not exp.name:
                raise UsageError(
                    "a run on several nodes needs the same run directory on every node: give "
                    "exp_manager.explicit_log_dir=DIR (or exp_manager.name=NAME)"
                )
            run_dir = new_run_dir(exp.exp_dir, exp.name, options.command)
    spec = REGISTRY[options.command]
    if spec.variant_key is not None:
        section = getattr(composed.tree.model, spec.section)
        check_variant(options.command, getattr(section, spec.variant_key))
    _set(composed.config, "exp_manager.explicit_log_dir", str(run_dir))
    composed.tree.exp_manager.explicit_log_dir = str(run_dir)
    if not composed.tree.exp_manager.resume_if_exists and resumed and not options.resume:
        resumed = False
    # --show-config prints the tree as composed, also one not complete yet (a KD run without
    # its teacher source): the typed conversion and its checks come with running it.
    run = None
    if not options.show_config:
        run = to_run_config(
            algorithm,  # type: ignore[arg-type]
            composed.tree,
            str(run_dir),
            base_model=base_model_for(composed.tree),
        )
    if options.resume and run is not None:
        run = dataclasses.replace(run, resume=True)
    return Prepared(
        composed=composed,
        run_dir=run_dir,
        run=run,
        launch=launch_options(options, composed.tree),
        demo=demo,
        resumed=resumed,
    )


def write_run_dir(
    run_dir: Path, composed: Composed, command: str, argv: tuple[str, ...] = ()
) -> None:
    """Create the run directory with ``config.yaml`` and ``run.json``."""
    from align_cli.rundir import atomic_write

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / CONFIG_FILE, to_yaml(composed.config))
    write_run_info(run_dir, command, composed.algorithm, list(argv) or sys.argv)


def execute(options: RunOptions, console: Console | None = None) -> int:
    """Run ``align run <command>``; return the exit status."""
    console = console or make_console()
    prepared = prepare(options)
    for note in prepared.composed.notes:
        console.print(f"note: {note}", highlight=False)
    if options.show_config:
        console.print(to_yaml(prepared.composed.config), highlight=False, markup=False)
        return 0
    if prepared.demo and launcher() is None:
        key = _DATA_KEY.get(prepared.composed.algorithm, "model.data.data_prefix")
        console.print(
            "demo: no model and no data given: training the tiny default model on align-data's "
            f"synthetic task (give --restore MODEL.nemo and {key}=FILE for a real run)",
            highlight=False,
        )
    if not options.dry_run and world_rank() == 0:
        from align_core.run_lock import check_run_dir_free

        check_run_dir_free(prepared.run_dir)  # before reading checkpoints another run writes
    if prepared.resumed and world_rank() == 0:
        console.print(_resume_line(prepared.run_dir), highlight=False, soft_wrap=True)
    if options.dry_run:
        from align_cli.plan import dry_run

        return dry_run(prepared, console)
    from align_cli.preflight import preflight

    preflight(prepared)  # the checks of --dry-run that need no pass over the data
    return launch(
        prepared.run_dir,
        prepared.composed,
        options,
        prepared.launch,
        console,
        discard_failed_start=True,
    )


def _resume_line(run_dir: Path) -> str:
    """Where the run resumes, after one line per damaged newer checkpoint passed over.

    Raises:
        UsageError: Checkpoints exist and none is intact (each one named with what is wrong).
    """
    from align_core.checkpoint import Checkpointer

    try:
        step, skipped = Checkpointer(run_dir / "checkpoints", keep_last=1).newest_intact()
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}") from exc
    if step is None:
        return f"resuming {run_dir}: no checkpoint yet, starting at step 0"
    damaged = "".join(
        "warning: checkpoints/{} is damaged ({}): passed over\n".format(*line.split(": ", 1))
        for line in skipped
    )
    return f"{damaged}resuming {run_dir} from step {step} (checkpoints/step_{step:06d})"


def launch(
    run_dir: Path,
    composed: Composed,
    options: RunOptions,
    how: LaunchOptions,
    console: Console,
    *,
    discard_failed_start: bool = False,
) -> int:
    """Write the run directory and run the workers: here, through torchrun, or as one rank.

    Under an outer torchrun or Slurm job the process on global rank 0 writes the directory and
    every process runs its rank; otherwise one process runs here, or torchrun starts
    ``how.world_size`` workers on ``run_dir``.

    With ``discard_failed_start``, a run directory this call created is removed again when the
    run fails on bad input (exit status 2) before training began (`run_started`), so that no
    stub is left behind.

    The process that writes the run directory holds its lock (`align_core.run_lock.RunDirLock`)
    until the run ends, so a second run into the same directory is refused with one line naming
    the holder's pid. A run stopped by Ctrl-C exits 130 once its checkpoint is saved.
    """
    from align_core.run_lock import RunDirLock

    created = not run_dir.exists()
    with contextlib.ExitStack() as lock:
        if launcher() is None or world_rank() == 0:
            lock.enter_context(RunDirLock(run_dir))
        status = _launch_locked(
            run_dir,
            composed,
            options,
            how,
            console,
            discard_failed_start=discard_failed_start and created,
        )
    return _interrupted_status(status)


def _interrupted_status(status: int) -> int:
    """130 instead of SIGTERM's 143 for a run that SIGINT (Ctrl-C) stopped and checkpointed."""
    import signal

    from align_core.trainer.signals import stop_signal

    if status == 128 + signal.SIGTERM and stop_signal() == signal.SIGINT:
        return 128 + signal.SIGINT
    return status


def _launch_locked(
    run_dir: Path,
    composed: Composed,
    options: RunOptions,
    how: LaunchOptions,
    console: Console,
    *,
    discard_failed_start: bool,
) -> int:
    from align_cli.worker import run_worker

    under = launcher()
    if under is not None:
        if world_rank() == 0:
            write_run_dir(run_dir, composed, options.command, options.argv)
        else:
            _wait_for(run_dir / RUN_FILE)
        return run_worker(run_dir, composed=composed, quiet=options.quiet, console=console)
    write_run_dir(run_dir, composed, options.command, options.argv)
    status: int | None = None
    try:
        if how.world_size > 1:
            if not options.quiet:
                console.print(
                    f"starting {how.world_size} workers (torchrun, {how.nproc_per_node} per node)"
                    " ...",
                    highlight=False,
                )
            status = run_torchrun(how, run_dir, quiet=options.quiet)
        else:
            status = run_worker(run_dir, composed=composed, quiet=options.quiet, console=console)
        return status
    except Exception as exc:
        expected = expected_failure(exc)
        status = expected[0] if expected else None
        raise
    finally:
        if discard_failed_start and status == 2 and not run_started(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)


_DATA_KEY = {"spin": "model.data.train_ds.file_path"}


def _wait_for(path: Path, timeout_s: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise UsageError(f"rank 0 did not create {path} within {timeout_s:.0f} s")
        time.sleep(0.2)
