"""Whether a model's positions cover the sequence length a run trains at.

A model with learned absolute position embeddings has one embedding row per position up to its
``seq_length``: a longer sequence would index past the table (an ``IndexError`` inside the
forward), so it is refused before anything is built. A RoPE model computes any position, but
one trained at a shorter length has never seen the positions beyond it: the run proceeds, with
a warning. `check_seq_length` is a pure function of the architecture and the length.
"""

from __future__ import annotations

from align_core.config import ModelConfig

__all__ = ["check_seq_length"]


def check_seq_length(
    model: ModelConfig, seq_length: int, *, key: str = "model.data.seq_length"
) -> str | None:
    """Check ``seq_length`` against the positions ``model`` has or was trained on.

    Args:
        model: The architecture (``seq_length`` is its trained length, NeMo's
            ``encoder_seq_length``).
        seq_length: The run's sequence length.
        key: The configuration key that set ``seq_length``, named in the messages.

    Returns:
        A warning for a RoPE model asked to train beyond its trained length, else None.

    Raises:
        ValueError: A learned-absolute-position model asked for more positions than it has.
    """
    if seq_length <= model.seq_length:
        return None
    if model.position_embedding_type == "learned_absolute":
        raise ValueError(
            f"{key}: {seq_length} is beyond the model's {model.seq_length} learned positions "
            f"(position_embedding_type learned_absolute); use {key}={model.seq_length} or less"
        )
    return (
        f"{key}: {seq_length} is beyond the {model.seq_length} positions the model was trained "
        f"on (RoPE computes them, but the model has never seen them; set {key}="
        f"{model.seq_length} to stay within them)"
    )
