"""megatron-core models, parallelism, checkpoints, trainer and algorithms for align."""

__all__: list[str] = []
