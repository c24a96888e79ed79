"""Shared fixtures: one single-process (TP=PP=DP=1, gloo) megatron set-up per test session."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

# Helpers and the torchrun script live next to the tests as plain modules with unique names.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def dist_ctx():
    """A world of one process with megatron's parallel state initialised (kept for the session)."""
    from align_core import ParallelConfig, init_distributed

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    return init_distributed(ParallelConfig(), seed=1234)
