"""Shared fixtures: one single-process (TP=PP=DP=1, gloo) megatron set-up per test session."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from align_core import DistributedContext, ParallelConfig, init_distributed

# Test helpers (``_core_*.py``) live next to the tests as plain modules with unique names.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def dist_ctx() -> DistributedContext:
    """A world of one process with megatron's parallel state initialised (kept for the session)."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    return init_distributed(ParallelConfig(), seed=1234)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models only lose time to OpenMP on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
