"""Package attributes imported on first use (PEP 562).

Importing a light submodule such as `align_core.algorithms.registry` then does not import torch
and megatron-core through the packages' ``__init__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` importing ``exports[name]`` (a module path) on first access.

    Args:
        package: The package's ``__name__`` (named in the error for an unknown attribute).
        exports: Attribute name → the module that defines it.
    """

    def attribute(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return attribute
