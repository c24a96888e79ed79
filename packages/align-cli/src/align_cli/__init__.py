"""The ``align`` command."""

__all__: list[str] = []
