"""Knowledge distillation from teacher top-k logits on megatron-core."""

__all__: list[str] = []
