"""Dense, obviously-correct reference implementations the tests compare against.

Everything here is written straight from the formulas in DESIGN.md with stock torch ops and
autograd: full ``[N, V]`` log-softmax, no chunking, no custom backward, no collectives.
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    log_probs = torch.log_softmax(logits, dim=-1)
    safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
    picked = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == ignore_index, torch.zeros_like(picked), picked)


def naive_topk_kd(
    student: Tensor,
    teacher_values: Tensor,
    teacher_ids: Tensor | None,
    *,
    divergence: str = "forward_kl",
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
    teacher_logsumexp: Tensor | None = None,
    cross_tokenizer: bool = False,
) -> Tensor:
    """The DESIGN.md table, literally: K-way or (K+1)-way KL with tails as 1 − Σ."""
    scaled = student_scale * student
    top_k = teacher_values.shape[-1]
    if cross_tokenizer:
        ids = torch.topk(scaled.detach(), top_k, dim=-1).indices
        teacher_values = torch.sort(teacher_values, dim=-1, descending=True).values
    else:
        ids = teacher_ids
    if teacher_logsumexp is None:
        log_q = torch.log_softmax(scaled.gather(-1, ids), dim=-1)
        log_p = torch.log_softmax(teacher_scale * teacher_values, dim=-1)
    else:
        q_ids = torch.softmax(scaled, dim=-1).gather(-1, ids)
        p_ids = torch.exp(teacher_values - teacher_logsumexp.unsqueeze(-1))
        q = torch.cat([q_ids, 1 - q_ids.sum(-1, keepdim=True)], dim=-1)
        p = torch.cat([p_ids, 1 - p_ids.sum(-1, keepdim=True)], dim=-1)
        log_q, log_p = q.log(), p.log()
    if divergence == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def dense_kl(teacher_logits: Tensor, student_logits: Tensor, divergence: str) -> Tensor:
    """Full-vocabulary KL between softmax(teacher) and softmax(student)."""
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    log_q = torch.log_softmax(student_logits, dim=-1)
    if divergence == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def assert_close_with_grad(
    out: Tensor,
    ref: Tensor,
    wrt: Tensor | tuple[Tensor, ...],
    weights: Tensor | None = None,
    **tolerances: float,
) -> tuple[Tensor, ...]:
    """Assert that ``out`` and ``ref`` agree in value and in gradient with respect to ``wrt``.

    The gradients are those of ``(values * weights).sum()`` (``values.sum()`` without weights);
    ``tolerances`` go to ``torch.testing.assert_close``. Returns the gradients of ``out``.
    """
    torch.testing.assert_close(out, ref, **tolerances)
    inputs = wrt if isinstance(wrt, tuple) else (wrt,)
    got = torch.autograd.grad(out.sum() if weights is None else (out * weights).sum(), inputs)
    want = torch.autograd.grad(ref.sum() if weights is None else (ref * weights).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerances)
    return got


def assert_zero_with_grad(out: Tensor, wrt: Tensor, atol: float) -> None:
    """Assert that ``out`` and the gradient of its sum with respect to ``wrt`` vanish (± atol)."""
    (grad,) = torch.autograd.grad(out.sum(), wrt)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=atol, rtol=0)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=atol, rtol=0)


class SavedTensorBytes:
    """Context manager recording every tensor autograd saves for backward."""

    def __init__(self) -> None:
        self.saved: list[Tensor] = []

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: Tensor) -> Tensor:
        self.saved.append(t)
        return t

    def large(self, numel: int, excluding: tuple[Tensor, ...] = ()) -> list[Tensor]:
        """Saved tensors with at least ``numel`` elements that are not views of ``excluding``."""
        own = {t.untyped_storage().data_ptr() for t in excluding}
        return [
            t
            for t in self.saved
            if t.numel() >= numel and t.untyped_storage().data_ptr() not in own
        ]
