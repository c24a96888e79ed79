"""Shared helpers of the end-to-end tests of the ``align`` command (CPU subprocesses).

The tests run with ``--import-mode=importlib``, so test modules cannot import each other; the
helpers are handed out as fixtures instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

AlignFn = Callable[..., subprocess.CompletedProcess]


def run_align(*args: str, cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``python -m align_cli ARGS`` in ``cwd`` (one thread, 120 columns); fail on exit != 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-m", "align_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"align {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def read_metrics(run_dir: Path, split: str = "train") -> dict[int, dict]:
    """The rows of ``run_dir/metrics.jsonl`` of one split, by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if row["split"] == split}


@pytest.fixture(scope="session")
def align() -> AlignFn:
    """`run_align`."""
    return run_align


@pytest.fixture(scope="session")
def metrics() -> Callable[..., dict[int, dict]]:
    """`read_metrics`."""
    return read_metrics


@pytest.fixture(scope="session")
def tiny_nemos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random ``.nemo`` files with one tokenizer: ``teacher`` (2 layers), ``student`` (1)."""
    root = tmp_path_factory.mktemp("tiny-nemos")
    paths = {"teacher": root / "teacher.nemo", "student": root / "student.nemo"}
    run_align("init-model", str(paths["teacher"]), "--num-layers", "2", "--seed", "1", cwd=root)
    run_align("init-model", str(paths["student"]), "--num-layers", "1", "--seed", "2", cwd=root)
    return paths
