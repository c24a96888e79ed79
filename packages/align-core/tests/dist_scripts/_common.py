"""Helpers shared by the subprocess scripts (imported lazily inside their `main`)."""

from __future__ import annotations

import functools

import torch

VOCAB = 256
GLOBAL_BATCH = 4
SEQ = 12


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic global batch: tokens and next-token labels with an unscored prompt."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :5] = -100
    return tokens, labels


def micro_batches(tokens, labels, micro: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"tokens": tokens[i : i + micro], "labels": labels[i : i + micro]}
        for i in range(0, len(tokens), micro)
    ]


def loss_fn(batch, logps):
    """Global-batch mean of the negative summed log-prob (the schedule's loss contract)."""
    seq = logps.sum(-1)
    return -seq.sum() / GLOBAL_BATCH, {"logps": seq.detach()}


def forward(**kwargs):
    from align_core import forward_token_logps

    return functools.partial(forward_token_logps, vocab_size=VOCAB, **kwargs)
