"""Errors raised when reading or writing Hugging Face checkpoints."""

from __future__ import annotations

__all__ = ["HFFormatError"]


class HFFormatError(ValueError):
    """A Hugging Face directory is unreadable, inconsistent or describes an unsupported model.

    The message names the file and, where there is one, the key or tensor.
    """
