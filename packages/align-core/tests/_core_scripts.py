"""Load the helper scripts that live next to the tests (``train_scripts/``, ...) as modules.

Tests run with ``--import-mode=importlib`` and the script folders are not packages, so each test
module executes the script it needs as a module of its own.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["TESTS", "load_script", "load_tiny"]

TESTS = Path(__file__).parent
"""This folder: the tests and their script folders."""


def load_script(path: Path, name: str) -> ModuleType:
    """Execute ``path`` as a fresh module called ``name`` (not registered in ``sys.modules``).

    Args:
        path: The Python file.
        name: The module's ``__name__``.

    Returns:
        The executed module.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tiny() -> ModuleType:
    """``train_scripts/tiny.py``: tiny data and a tiny trainer, as a fresh module."""
    return load_script(TESTS / "train_scripts" / "tiny.py", "_align_core_tests_tiny")
