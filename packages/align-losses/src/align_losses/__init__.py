"""Memory-lean loss functions for preference alignment and distillation."""

__all__: list[str] = []
