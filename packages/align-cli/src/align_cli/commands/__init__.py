"""Implementations of the ``align`` sub-commands (imported only when the command runs)."""

__all__: list[str] = []
