"""Importing the libraries of optional extras, with an install hint when one is missing."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_extra"]


def import_extra(module: str, purpose: str, extra: str) -> Any:
    """Imports ``module``, which comes with the ``align-data[extra]`` extra.

    Args:
        module: Dotted module name (for example ``"pyarrow.parquet"``).
        purpose: What needs it, the start of the error message.
        extra: Name of the extra that installs it.

    Returns:
        The imported module.

    Raises:
        ImportError: ``"{purpose}: pip install 'align-data[{extra}]'"`` when it is missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{purpose}: pip install 'align-data[{extra}]'") from exc
