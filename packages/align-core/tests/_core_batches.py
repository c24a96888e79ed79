"""Random scored batches for the algorithm-step tests (no model, no megatron).

A batch holds ``labels`` with ignored (``-100``) prompt and padding positions at both ends of
each row, the token log-probs of the scored positions (zero elsewhere) and, optionally, the
reference's sequence log-probs. The tests derive their expected values from these tensors.
"""

from __future__ import annotations

import torch

from align_core.algorithms._common import padded_segment_ids

__all__ = ["random_batch"]


def random_batch(
    num_seqs: int,
    *,
    seed: int,
    length: int,
    max_end_trim: int,
    logp_scale: float,
    ref_scale: float | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A batch of ``num_seqs`` rows of ``length`` labels drawn from ``seed``.

    Args:
        num_seqs: Number of sequences (rows).
        seed: Seed of the generator every tensor is drawn from.
        length: Row length.
        max_end_trim: Each row ignores fewer than this many positions at its end (and fewer
            than 3 at its start).
        logp_scale: Token log-probs are uniform in ``(-logp_scale, 0]``.
        ref_scale: Reference sequence log-probs are uniform in ``(-ref_scale, 0]``; None: the
            batch has no ``ref_logps``.

    Returns:
        The batch, the token log-probs (requiring grad) and the mask of scored positions.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 50, (num_seqs, length), generator=g)
    for r in range(num_seqs):
        start = int(torch.randint(0, 3, (), generator=g))
        stop = length - int(torch.randint(0, max_end_trim, (), generator=g))
        labels[r, :start] = -100
        labels[r, stop:] = -100
    token_logps = -torch.rand(num_seqs, length, generator=g, dtype=torch.float64) * logp_scale
    mask = labels != -100
    token_logps = torch.where(mask, token_logps, torch.zeros_like(token_logps))
    batch = {
        "labels": labels,
        "segment_ids": padded_segment_ids(labels),
        "seq_token_counts": mask.sum(-1).double(),
    }
    if ref_scale is not None:
        batch["ref_logps"] = -torch.rand(num_seqs, generator=g, dtype=torch.float64) * ref_scale
    return batch, token_logps.requires_grad_(), mask
