"""Shared fixtures of the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.main import app


@pytest.fixture(scope="module")
def tiny_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer, 32-wide ``.nemo`` written by ``align init-model`` (one per test module)."""
    path = tmp_path_factory.mktemp("model") / "tiny.nemo"
    args = ["init-model", str(path), "--num-layers", "1", "--hidden-size", "32"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path
