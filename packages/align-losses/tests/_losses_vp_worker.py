"""Worker for the 2-process gloo test of vocabulary-parallel calls.

Every rank builds the same full-vocabulary tensors from one seed, keeps its own uneven slice of
the vocabulary (rank 0: ids 0-5, rank 1: ids 6-10), runs the sharded call, and compares value and
gradient with the unsharded call on the full tensors (and, where one exists, with the dense
reference). Each check's outcome (None or a traceback) is written to ``rank<r>.json``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _losses_reference import naive_token_logps, naive_topk_kd

import align_losses._common as common
from align_losses import (
    chunked_linear_logps,
    full_vocab_kd_loss,
    kto_loss,
    sequence_logps,
    token_logps,
    topk_kd_loss,
)

VOCAB = 11
BOUNDS = [0, 6, 11]


def _slice(rank: int) -> slice:
    return slice(BOUNDS[rank], BOUNDS[rank + 1])


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _sharded_matches_whole(
    rank: int,
    loss: Callable[..., torch.Tensor],
    student: torch.Tensor,
    upstream: torch.Tensor,
    args: tuple[torch.Tensor, ...],
    local_args: tuple[torch.Tensor, ...],
    local_kwargs: dict[str, Any],
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Check that ``loss`` on this rank's vocabulary slice equals ``loss`` on the whole student.

    The sharded call gets ``local_args`` and ``local_kwargs`` (group, vocabulary offset) on top
    of ``kwargs``; the whole call gets ``args``. Values and the gradients with respect to the
    student logits (under ``upstream``) must match; returns the sharded result.
    """
    local = student[..., _slice(rank)].clone().requires_grad_()
    full = student.clone().requires_grad_()
    out = loss(local, *local_args, **local_kwargs, **kwargs)
    ref = loss(full, *args, **kwargs)
    _close(out, ref)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    _close(local.grad, full.grad[..., _slice(rank)])
    return out


def _token_logps_sharded_matches_whole(
    rank: int,
    group: dist.ProcessGroup,
    logits: torch.Tensor,
    labels: torch.Tensor,
    upstream: torch.Tensor,
) -> torch.Tensor:
    """:func:`_sharded_matches_whole` for ``token_logps``."""
    local_kwargs = dict(group=group, vocab_start=BOUNDS[rank])
    return _sharded_matches_whole(
        rank, token_logps, logits, upstream, (labels,), (labels,), local_kwargs, {}
    )


def check_token_logps(rank: int, group: dist.ProcessGroup) -> None:
    gen = torch.Generator().manual_seed(0)
    for scale in (3.0, 1e4):
        full = torch.randn(2, 5, VOCAB, generator=gen, dtype=torch.float64) * scale
        labels = torch.randint(0, VOCAB, (2, 5), generator=gen)
        labels[0, 0] = -100
        weights = torch.randn(2, 5, generator=gen, dtype=torch.float64)
        out = _token_logps_sharded_matches_whole(rank, group, full, labels, weights)
        _close(out, naive_token_logps(full, labels))


def check_token_logps_padded_shard(rank: int, group: dist.ProcessGroup) -> None:
    # Rank 1's slice of the first rows is all −inf (as for padded vocabulary entries).
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(4, VOCAB, generator=gen, dtype=torch.float64)
    full[:2, BOUNDS[1] :] = float("-inf")
    labels = torch.tensor([0, 5, 7, 10])
    _token_logps_sharded_matches_whole(rank, group, full, labels, torch.ones(4, dtype=full.dtype))


def check_sequence_logps_average(rank: int, group: dist.ProcessGroup) -> None:
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(3, 4, VOCAB, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (3, 4), generator=gen)
    labels[1] = -100
    local = full[..., _slice(rank)]
    out = sequence_logps(local, labels, average=True, group=group, vocab_start=BOUNDS[rank])
    _close(out, sequence_logps(full, labels, average=True))
    assert out[1].item() == 0.0


def check_chunked_linear_logps(rank: int, group: dist.ProcessGroup) -> None:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (7,), generator=gen)
    labels[3] = -100
    grad_out = torch.randn(7, generator=gen, dtype=torch.float64)
    h_local = hidden.clone().requires_grad_()
    w_local = weight[_slice(rank)].clone().requires_grad_()
    out = chunked_linear_logps(
        h_local, w_local, labels, chunk_size=3, group=group, vocab_start=BOUNDS[rank]
    )
    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = chunked_linear_logps(h_full, w_full, labels, chunk_size=3)
    _close(out, ref)
    _close(out, naive_token_logps(hidden @ weight.T, labels))
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    _close(h_local.grad, h_full.grad)
    _close(w_local.grad, w_full.grad[_slice(rank)])


def _topk_case(
    gen: torch.Generator, k: int, divergence: str, tail: bool, cross: bool, **params: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A random student, the top-K of a random teacher, and ``topk_kd_loss`` keyword arguments."""
    student = torch.randn(2, 3, VOCAB, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, VOCAB, generator=gen, dtype=torch.float64) * 2
    values, ids = teacher.topk(k, dim=-1)
    kwargs = dict(
        divergence=divergence,
        student_scale=0.8,
        teacher_logsumexp=teacher.logsumexp(-1) if tail else None,
        cross_tokenizer=cross,
        **params,
    )
    return student, values, ids, kwargs


def _topk_sharded_matches_whole(
    rank: int,
    group: dist.ProcessGroup,
    student: torch.Tensor,
    upstream: torch.Tensor,
    teacher_topk: tuple[torch.Tensor, torch.Tensor],
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """:func:`_sharded_matches_whole` for ``topk_kd_loss`` with the teacher's (values, ids)."""
    local_kwargs = dict(group=group, vocab_start=BOUNDS[rank])
    return _sharded_matches_whole(
        rank, topk_kd_loss, student, upstream, teacher_topk, teacher_topk, local_kwargs, kwargs
    )


def check_topk_kd_loss(rank: int, group: dist.ProcessGroup) -> None:
    gen = torch.Generator().manual_seed(3)
    for divergence, tail, cross, k in itertools.product(
        ("forward_kl", "reverse_kl"), (False, True), (False, True), (4, 7)
    ):
        student, values, ids, kwargs = _topk_case(gen, k, divergence, tail, cross)
        weights = torch.rand(2, 3, generator=gen, dtype=torch.float64)
        out = _topk_sharded_matches_whole(rank, group, student, weights, (values, ids), kwargs)
        _close(out, naive_topk_kd(student, values, ids, **kwargs))


MIXTURE_SETTINGS = (
    ("jsd", dict(beta=0.3)),
    ("jsd", dict(beta=0.5)),
    ("skew_forward_kl", dict(skew=0.2)),
    ("skew_reverse_kl", dict(skew=0.2)),
)


def check_topk_kd_mixtures(rank: int, group: dist.ProcessGroup) -> None:
    gen = torch.Generator().manual_seed(6)
    for (divergence, params), tail, cross, k in itertools.product(
        MIXTURE_SETTINGS, (False, True), (False, True), (4, 7)
    ):
        student, values, ids, kwargs = _topk_case(gen, k, divergence, tail, cross, **params)
        kwargs["token_weights"] = torch.rand(2, 3, generator=gen, dtype=torch.float64)
        upstream = torch.randn(2, 3, generator=gen, dtype=torch.float64)
        _topk_sharded_matches_whole(rank, group, student, upstream, (values, ids), kwargs)


def check_full_vocab_kd_loss(rank: int, group: dist.ProcessGroup) -> None:
    gen = torch.Generator().manual_seed(7)
    settings = (("forward_kl", {}), ("reverse_kl", {}), *MIXTURE_SETTINGS)
    for divergence, params in settings:
        student = torch.randn(2, 4, VOCAB, generator=gen, dtype=torch.float64) * 3
        teacher = torch.randn(2, 4, VOCAB, generator=gen, dtype=torch.float64) * 3
        # Padded vocabulary: rank 1's slice of the first row is −inf on both sides.
        student[0, 0, BOUNDS[1] :] = float("-inf")
        teacher[0, 0, BOUNDS[1] :] = float("-inf")
        kwargs = dict(divergence=divergence, student_scale=0.9, teacher_scale=1.1, **params)
        upstream = torch.randn(2, 4, generator=gen, dtype=torch.float64)
        _sharded_matches_whole(
            rank,
            full_vocab_kd_loss,
            student,
            upstream,
            (teacher,),
            (teacher[..., _slice(rank)],),
            dict(group=group),
            kwargs,
        )


def check_kto_group_baseline(rank: int, group: dist.ProcessGroup) -> None:
    def baseline(per_rank: list[list[float]]) -> float:
        kl = torch.tensor(per_rank[rank], dtype=torch.float64)
        out = kto_loss(
            torch.tensor([0.5, -0.5], dtype=torch.float64),
            torch.zeros(2, dtype=torch.float64),
            torch.tensor([True, False]),
            kl,
            torch.zeros_like(kl),
            beta=1.0,
            group=group,
        )
        z0 = out.kl.item()
        expected = [1 / (1 + torch.e ** (0.5 - z0)), 1 / (1 + torch.e ** (z0 + 0.5))]
        _close(out.losses, torch.tensor(expected, dtype=torch.float64))
        return z0

    # Uneven KL batches: the mean is over all 8 samples (36 / 8), not the mean of rank means.
    assert abs(baseline([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0, 8.0]]) - 4.5) < 1e-12
    # Averaged before the clamp: (−20 + 3) / 5 < 0 → 0 (clamp-then-average would give 0.5).
    assert baseline([[-10.0, -10.0], [1.0, 1.0, 1.0]]) == 0.0
    # A rank without KL samples contributes nothing.
    assert abs(baseline([[], [2.0, 4.0]]) - 3.0) < 1e-12


CHECKS: dict[str, Callable[[int, dist.ProcessGroup], None]] = {
    "token_logps": check_token_logps,
    "token_logps_padded_shard": check_token_logps_padded_shard,
    "sequence_logps_average": check_sequence_logps_average,
    "chunked_linear_logps": check_chunked_linear_logps,
    "topk_kd_loss": check_topk_kd_loss,
    "kto_group_baseline": check_kto_group_baseline,
    "topk_kd_mixtures": check_topk_kd_mixtures,
    "full_vocab_kd_loss": check_full_vocab_kd_loss,
}


def run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """``torch.multiprocessing.spawn`` entry point."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    torch.set_num_threads(1)
    common.CHUNK_ELEMENTS = 24  # several row chunks even for these tiny tensors
    group = dist.new_group(list(range(world_size)))
    results: dict[str, str | None] = {}
    try:
        for name, check in CHECKS.items():
            try:
                start = time.perf_counter()
                check(rank, group)
                print(f"rank {rank} {name}: {time.perf_counter() - start:.2f} s", flush=True)
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
