"""Dataset formats, validation, tokenization, collate, packing and samplers."""

__all__: list[str] = []
