"""Pure functions that bring prompts, however they are padded, into the generator's layout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["PaddingSide", "right_pad", "unpad_prompts"]

PaddingSide = Literal["left", "right"]


def unpad_prompts(
    tokens: torch.Tensor, lengths: torch.Tensor | Sequence[int], padding_side: PaddingSide
) -> list[list[int]]:
    """Strip the padding from a batch of prompts.

    Args:
        tokens: ``[B, S]`` padded prompt tokens.
        lengths: ``[B]`` real length of each prompt.
        padding_side: ``"right"`` (tokens first) or ``"left"`` (padding first).

    Returns:
        One list of token ids per prompt.

    Raises:
        ValueError: On a length outside ``[1, S]`` or an unknown padding side.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = tokens.size(1)
    rows = tokens.tolist()
    out: list[list[int]] = []
    for i, n in enumerate(torch.as_tensor(lengths).tolist()):
        if not 1 <= n <= width:
            raise ValueError(f"prompt {i}: length {n} is outside [1, {width}]")
        out.append(rows[i][:n] if padding_side == "right" else rows[i][width - n :])
    return out


def right_pad(
    prompts: Sequence[Sequence[int]], width: int, pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts into ``[B, width]`` (the generator's layout: column = position).

    Args:
        prompts: Token ids of each prompt.
        width: Columns of the result (at least the longest prompt).
        pad_id: Id written after each prompt.
        device: Where the tensors go.

    Returns:
        ``(tokens [B, width] int64, lengths [B] int64)``.
    """
    lengths = [len(p) for p in prompts]
    if lengths and max(lengths) > width:
        raise ValueError(f"prompt of {max(lengths)} tokens does not fit in {width} columns")
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    return tokens.to(device), torch.tensor(lengths, dtype=torch.long, device=device)
