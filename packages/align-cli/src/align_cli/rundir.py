"""Run directories: where a run's config, metrics, events, checkpoints and plots live.

Layout of a run directory::

    config.yaml      the composed configuration tree (what the workers read)
    run.json         algorithm, command line, versions, creation time
    metrics.jsonl    one JSON object per logged step: {"split", "step", "time", <metrics>}
    summary.json     how the run ended (written by rank 0 at the end)
    tb/              TensorBoard events (when tensorboard is installed)
    plots/           PNG charts (``align plot RUN_DIR`` rewrites them)
    checkpoints/ ... written by align-core's trainer (and final.nemo)
    .lock            flock'ed by the process running the run, which it names (a second run
                     into the directory is refused: `align_core.run_lock.RunDirLock`)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from align_cli.errors import UsageError

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "RUN_FILE",
    "SUMMARY_FILE",
    "RunInfo",
    "find_last_run",
    "new_run_dir",
    "read_run_info",
    "run_started",
    "write_run_info",
]

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
_DISTS = ("align-losses", "align-data", "align-core", "align-kd", "align-cli")


@dataclass(frozen=True)
class RunInfo:
    """What ``run.json`` records about a run.

    Attributes:
        command: ``dpo``, ``ipo``, ``rpo``, ``kto`` or ``sft`` (what was typed after ``run``).
        algorithm: The configuration tree used: ``dpo``, ``kto`` or ``sft``.
        argv: The command line.
        created: Creation time (ISO 8601, local time).
        versions: Installed version of each align package.
    """

    command: str
    algorithm: str
    argv: tuple[str, ...]
    created: str
    versions: dict[str, str]


def _versions() -> dict[str, str]:
    out = {}
    for dist in _DISTS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def write_run_info(run_dir: Path, command: str, algorithm: str, argv: list[str]) -> RunInfo:
    """Write ``run.json`` (keeping the original creation time when the run is resumed)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = run_dir / RUN_FILE
    if path.exists():
        created = json.loads(path.read_text()).get("created", created)
    info = RunInfo(command, algorithm, tuple(argv), created, _versions())
    payload: dict[str, Any] = {
        "command": info.command,
        "algorithm": info.algorithm,
        "argv": list(info.argv),
        "created": info.created,
        "versions": info.versions,
    }
    _atomic_write(path, json.dumps(payload, indent=2) + "\n")
    return info


def read_run_info(run_dir: Path) -> RunInfo:
    """Read ``run.json`` of a run directory.

    Raises:
        UsageError: The directory is not a run directory.
    """
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a run directory (no {RUN_FILE})")
    data = json.loads(path.read_text())
    return RunInfo(
        command=data["command"],
        algorithm=data["algorithm"],
        argv=tuple(data.get("argv", ())),
        created=data.get("created", ""),
        versions=dict(data.get("versions", {})),
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    _atomic_write(path, text)


def new_run_dir(exp_dir: str, name: str | None, command: str) -> Path:
    """A fresh run directory path: ``<exp_dir>/<name>`` or ``<exp_dir>/<command>-<timestamp>``.

    Under Slurm the default name carries the job and step ids instead of a timestamp, so every
    task of the job (each composes its own configuration) agrees on it.
    """
    if name:
        return Path(exp_dir) / name
    job = os.environ.get("SLURM_JOB_ID")
    if job and "SLURM_PROCID" in os.environ:
        step = os.environ.get("SLURM_STEP_ID", "0")
        return Path(exp_dir) / f"{command}-slurm{job}.{step}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(exp_dir) / f"{command}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(exp_dir) / f"{command}-{stamp}-{suffix}"
    return path


def run_started(run_dir: Path) -> bool:
    """Whether training began in ``run_dir``: metrics were opened or a checkpoint was written.

    A directory where it did not (``config.yaml`` and ``run.json`` of a start that failed) has
    nothing to resume.
    """
    if (run_dir / METRICS_FILE).exists():
        return True
    if any((run_dir / "checkpoints").glob("step_*")):
        return True
    return any((run_dir / "generations").glob("iter_*.jsonl"))  # SPIN's first generation


def find_last_run(exp_dir: str, command: str) -> Path:
    """The most recently created run directory of ``command`` under ``exp_dir`` that started.

    Directories where training never began (`run_started`: a failed start) are passed over.

    Raises:
        UsageError: There is none.
    """
    root = Path(exp_dir)
    candidates = []
    stubs = []
    if root.is_dir():
        for child in root.iterdir():
            info_path = child / RUN_FILE
            if not (child / CONFIG_FILE).is_file() or not info_path.is_file():
                continue
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError):
                continue
            if info.get("command") != command:
                continue
            if not run_started(child):
                stubs.append(child)
                continue
            candidates.append((info.get("created", ""), info_path.stat().st_mtime, child))
    if not candidates:
        never = ""
        if stubs:
            dirs = "directory there" if len(stubs) == 1 else "directories there"
            never = f" ({len(stubs)} run {dirs} never started training, e.g. {stubs[0]})"
        raise UsageError(
            f"--resume: no `align run {command}` run to continue under {root}/{never}; "
            "give the run directory with exp_manager.explicit_log_dir=DIR"
        )
    return max(candidates)[2]
