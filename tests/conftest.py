"""Shared helpers of the end-to-end tests of the ``align`` command (CPU subprocesses).

The tests run with ``--import-mode=importlib``, so test modules cannot import each other; the
helpers are handed out as fixtures instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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


def _load_hf_models() -> ModuleType:
    """``tests/hf_models.py`` by file path (test modules cannot import each other)."""
    spec = importlib.util.spec_from_file_location(
        "align_tests_hf_models", Path(__file__).with_name("hf_models.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_hf_models = _load_hf_models()


@pytest.fixture(scope="session")
def hf_models() -> ModuleType:
    """The `tests/hf_models.py` module (tiny Hugging Face models); skips without transformers."""
    try:
        _hf_models.require("transformers")
    except ModuleNotFoundError as error:
        pytest.skip(f"Hugging Face models: {error}")
    return _hf_models


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face directory, built once per machine (~30 s)
    into the test cache; skips without the ``hf`` dependency group."""
    try:
        return _hf_models.smollm2_dir()
    except ModuleNotFoundError as error:
        pytest.skip(f"SmolLM2 fixture: {error}")


@pytest.fixture(scope="session")
def dist_ctx():
    """A world of one process with megatron's parallel state initialised (in-process tests)."""
    import warnings

    from align_core import ParallelConfig, init_distributed

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    return init_distributed(ParallelConfig(), seed=1234)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models only lose time to OpenMP on shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
