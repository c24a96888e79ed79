"""Knowledge distillation from a teacher's top-K logits.

The teacher's top-K logits and ids are cached offline (one ``[N, K]`` pair per token); the
student's full logits are live. Two student-side custom autograd functions keep memory lean:

* ``_GatherColumns`` picks the student logits at the K ids (summed over the vocabulary shards)
  and saves only the ids for backward: the K-way renormalised loss never needs a full softmax.
* ``_TopKTailLogProbs`` returns the student's log-probabilities of the K ids *and* of the tail
  bucket (everything else) under the full-vocabulary softmax. It saves the logits, the K + 1
  log-probs and one float per token, and recomputes the softmax a chunk of rows at a time in
  backward; the tail mass is computed directly from the tail logits, not as ``1 − Σ q_i``, so
  it stays accurate when the top-K hold almost all of the mass.

The divergence itself is then computed on ``[N, K]`` (or ``[N, K + 1]``) tensors with ordinary
autograd.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from align_losses._common import Workspace, compute_dtype, row_chunks, upcast
from align_losses._vocab_parallel import (
    ProcessGroup,
    all_gather_cat,
    combine_logsumexp,
    gather_owned,
    owned_columns,
)

__all__ = ["topk_kd_loss"]

KDDivergence = Literal["forward_kl", "reverse_kl"]


class _GatherColumns(torch.autograd.Function):
    """``logits[..., ids]`` for global ids over vocabulary shards; backward scatters into zeros."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        ids: Tensor,
        vocab_start: int,
        group: ProcessGroup | None,
    ) -> Tensor:
        ctx.logits_meta = (logits.shape, logits.dtype, logits.device)
        if group is None:
            columns = ids.long() - vocab_start
            ctx.save_for_backward(columns, None)
            return logits.gather(-1, columns)
        columns, owned = owned_columns(ids, vocab_start, logits.shape[-1])
        ctx.save_for_backward(columns, owned)
        return gather_owned(logits, columns, owned, group)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        columns, owned = ctx.saved_tensors
        shape, dtype, device = ctx.logits_meta
        grad = torch.zeros(shape, dtype=dtype, device=device)
        if owned is not None:
            grad_out = torch.where(owned, grad_out, torch.zeros_like(grad_out))
        grad.scatter_add_(-1, columns, grad_out.to(dtype))
        return grad, None, None, None


class _TopKTailLogProbs(torch.autograd.Function):
    """Student log-probs ``[..., K + 1]`` of K ids and of the tail under ``softmax(scale·z)``.

    Forward, per row: ``L`` = log-sum-exp over the vocabulary and ``L_tail`` over the tokens
    that are not among the ids (the ids' exponentials are zeroed, not subtracted, so the tail
    stays exact). Backward, with ``G = ∂loss/∂log q`` and ``z' = scale·z``:

    * tail token v: ``∂/∂z'_v = exp(z'_v − L_tail)·(G_tail − q_tail·Σ_c G_c)``
      (since ``softmax_v = exp(z'_v − L_tail)·q_tail``): one exp per element, always ≤ 1;
    * id token i: ``∂/∂z'_i = G_i − q_i·Σ_c G_c``, written over the tail formula.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        ids: Tensor,
        scale: float,
        vocab_start: int,
        group: ProcessGroup | None,
    ) -> Tensor:
        vocab_local = logits.shape[-1]
        top_k = ids.shape[-1]
        cdt = compute_dtype(logits.dtype)
        flat_ids = ids.reshape(-1, top_k)
        columns, owned = owned_columns(flat_ids, vocab_start, vocab_local)
        # Ids this rank does not own point at an extra, always-zero column of the buffer.
        padded = torch.where(owned, columns, torch.full_like(columns, vocab_local))

        num_rows = flat_ids.shape[0]
        # Per row: shift, log Σ_v exp(z'_v − shift), log Σ_{v ∉ ids} exp(z'_v − shift).
        parts = torch.empty(num_rows, 3, dtype=cdt, device=logits.device)
        work = Workspace(vocab_local + 1, cdt, logits.device)
        for rows, chunk in row_chunks(logits):
            buf = work.rows(chunk.shape[0])
            shift = chunk.amax(dim=1, keepdim=True).to(cdt) * scale
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            torch.add(-shift, chunk, alpha=scale, out=buf[:, :vocab_local])
            buf[:, :vocab_local].exp_()
            buf[:, vocab_local] = 0.0
            parts[rows, 0] = shift.squeeze(1)
            parts[rows, 1] = buf.sum(dim=1).log_()
            buf.scatter_(1, padded[rows], 0.0)
            parts[rows, 2] = buf.sum(dim=1).log_()
        del work
        shifts, log_sums = combine_logsumexp(
            parts[:, :1].expand(-1, 2).contiguous(), parts[:, 1:].contiguous(), group
        )
        # Over a group the two sums can get different shifts (a rank whose tail is empty does
        # not vote for the tail's shift): re-base the tail onto the total's shift.
        shift = shifts[:, 0]
        log_total = log_sums[:, 0]
        log_tail = log_sums[:, 1] + (shifts[:, 1] - shift)

        picked = gather_owned(logits, columns.view(ids.shape), owned.view(ids.shape), group)
        picked = picked.reshape(-1, top_k).to(cdt) * scale
        out = torch.cat(
            [
                (picked - shift.unsqueeze(1)) - log_total.unsqueeze(1),
                (log_tail - log_total).unsqueeze(1),
            ],
            dim=1,
        )
        ctx.save_for_backward(logits, columns, owned, out, shift + log_tail)
        ctx.scale = scale
        return out.view(*ids.shape[:-1], top_k + 1)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None, None]:
        logits, columns, owned, log_q, tail_lse = ctx.saved_tensors
        scale = ctx.scale
        vocab_local = logits.shape[-1]
        cdt = log_q.dtype
        top_k = columns.shape[-1]
        g = grad_out.reshape(-1, top_k + 1).to(cdt)
        q = log_q.exp()
        g_sum = g.sum(dim=1, keepdim=True)
        # Coefficients already carry the chain-rule factor of z' = scale·z.
        tail_coef = scale * (g[:, top_k : top_k + 1] - q[:, top_k : top_k + 1] * g_sum)
        id_grad = scale * (g[:, :top_k] - q[:, :top_k] * g_sum)
        # No tail (K covers the vocabulary): every token is an id and is overwritten below.
        tail_lse = torch.where(torch.isfinite(tail_lse), tail_lse, torch.zeros_like(tail_lse))
        neg_tail_lse = tail_lse.neg().unsqueeze(1)

        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad.view(-1, vocab_local)
        direct = cdt == logits.dtype
        work = None if direct else Workspace(vocab_local, cdt, logits.device)
        for rows, chunk in row_chunks(logits):
            out = grad_rows[rows]
            buf = out if work is None else work.rows(chunk.shape[0])
            torch.add(neg_tail_lse[rows], chunk, alpha=scale, out=buf)
            # Tail tokens have z'_v ≤ L_tail; the clamp only keeps id positions finite.
            buf.clamp_(max=0.0).exp_().mul_(tail_coef[rows])
            current = buf.gather(1, columns[rows])
            fix = torch.where(owned[rows], id_grad[rows] - current, torch.zeros_like(current))
            buf.scatter_add_(1, columns[rows], fix)
            if work is not None:
                out.copy_(buf)
        return grad, None, None, None, None


def _student_topk_ids(
    logits: Tensor, top_k: int, vocab_start: int, group: ProcessGroup | None
) -> Tensor:
    """Global ids of the student's top-K logits, sorted by descending logit."""
    with torch.no_grad():
        if group is None:
            return torch.topk(logits, top_k, dim=-1).indices
        local_k = min(top_k, logits.shape[-1])
        values, ids = torch.topk(logits, local_k, dim=-1)
        if local_k < top_k:
            pad = (0, top_k - local_k)
            values = F.pad(values, pad, value=float("-inf"))
            ids = F.pad(ids, pad, value=-1)
        values = all_gather_cat(values, group)
        ids = all_gather_cat(ids + vocab_start, group)
        best = torch.topk(values, top_k, dim=-1).indices
        return ids.gather(-1, best)


def _divergence(p: Tensor, log_p: Tensor, log_q: Tensor, divergence: KDDivergence) -> Tensor:
    """Σ_c p_c(log p_c − log q_c) or Σ_c q_c(log q_c − log p_c), with 0·log 0 = 0."""
    if divergence == "forward_kl":
        # ∂/∂log q = −p: finite even where log q = −inf, so no clamp is needed.
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    else:
        # Clamped so that a class with q = 0 never meets (−inf)·0 in backward.
        lowest = torch.finfo(log_q.dtype).min
        log_p = log_p.clamp(min=lowest)
        log_q = log_q.clamp(min=lowest)
        q = log_q.exp()
        terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    return terms.sum(dim=-1)


def topk_kd_loss(
    student_logits: Tensor,
    teacher_topk_logits: Tensor,
    teacher_topk_ids: Tensor | None,
    *,
    divergence: KDDivergence = "forward_kl",
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
    teacher_logsumexp: Tensor | None = None,
    cross_tokenizer: bool = False,
    group: ProcessGroup | None = None,
    vocab_start: int = 0,
) -> Tensor:
    r"""Per-token KL divergence between the teacher's top-K distribution and the student's.

    Default (K-way, as NeMo-Aligner): both distributions are renormalised over the teacher's K
    ids :math:`k_1..k_K`,

    .. math::
        p = \mathrm{softmax}(s_t\,t), \qquad q = \mathrm{softmax}\big(s_s\,z_{k_1..k_K}\big)

    and the loss is the forward KL :math:`\sum_i p_i(\log p_i - \log q_i)` (teacher first, mode
    covering; Hinton et al., 2015, https://arxiv.org/abs/1503.02531) or the reverse KL
    :math:`\sum_i q_i(\log q_i - \log p_i)` (mode seeking; Gu et al., 2023, MiniLLM,
    https://arxiv.org/abs/2306.08543). The gradient only touches the K ids.

    Tail bucket (``teacher_logsumexp`` = L, the teacher's full-vocabulary log-sum-exp; needs
    :math:`s_t = 1`): K + 1 classes, the K ids and "everything else",

    .. math::
        p_i = e^{t_i - L},\ p_{tail} = 1 - \sum_i p_i; \qquad
        q_i = \mathrm{softmax}(s_s z)_{k_i},\ q_{tail} = 1 - \sum_i q_i

    and the same KL over the K + 1 classes. :math:`q_{tail}` is computed from the tail logits
    themselves (exact even when it is tiny); :math:`p_{tail}` is clamped at 0 and its log at the
    smallest normal float. Where the student's tail is empty (the ids cover its whole
    vocabulary, e.g. K = V) the tail class is dropped.

    Cross-tokenizer (``cross_tokenizer=True``): the ids are the student's own top-K of
    :math:`s_s z` and the teacher logits are sorted descending; the i-th largest student logit is
    paired with the i-th largest teacher logit (token identities are ignored), then the loss is
    as above. ``teacher_topk_ids`` is not used and may be None.

    Vocabulary parallelism: with ``group``, ``student_logits`` is this rank's slice starting at
    ``vocab_start`` and the teacher ids are global; values and gradients equal the unsharded
    call. Teacher tensors are treated as constants (no gradient).

    Args:
        student_logits: ``[..., V]`` (or ``[..., V_local]``) student logits, any float dtype.
        teacher_topk_logits: ``[..., K]`` teacher logits of its top-K tokens.
        teacher_topk_ids: ``[..., K]`` their global vocabulary ids (distinct within a row).
        divergence: ``"forward_kl"`` (KL(teacher ‖ student)) or ``"reverse_kl"``.
        student_scale: :math:`s_s > 0`, multiplies the student logits (an inverse temperature).
        teacher_scale: :math:`s_t > 0`, multiplies the teacher logits.
        teacher_logsumexp: ``[...]`` teacher log-sum-exp over its full vocabulary; turns on the
            tail bucket.
        cross_tokenizer: pair the student's own top-K with the teacher's by rank.
        group: process group the student vocabulary is sharded over, or None.
        vocab_start: first global vocabulary id of this rank's slice.

    Returns:
        ``[...]`` per-token loss in float32 (float64 for float64 student logits). Mask padding
        positions and reduce yourself.

    Raises:
        ValueError: on mismatched shapes, K larger than the vocabulary, non-positive scales, an
            unknown divergence, or a tail bucket with ``teacher_scale != 1``.
    """
    if divergence not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"divergence must be 'forward_kl' or 'reverse_kl', got {divergence!r}")
    if not (student_scale > 0 and teacher_scale > 0):
        raise ValueError("student_scale and teacher_scale must be positive")
    if teacher_logsumexp is not None and teacher_scale != 1.0:
        raise ValueError("the tail bucket (teacher_logsumexp) needs teacher_scale == 1")
    lead, top_k = teacher_topk_logits.shape[:-1], teacher_topk_logits.shape[-1]
    if student_logits.shape[:-1] != lead:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_topk_logits "
            f"{tuple(teacher_topk_logits.shape)} differ before the last dimension"
        )
    if top_k < 1 or (group is None and top_k > student_logits.shape[-1]):
        raise ValueError(f"K = {top_k} must be in [1, V = {student_logits.shape[-1]}]")
    if teacher_logsumexp is not None and teacher_logsumexp.shape != lead:
        raise ValueError(f"teacher_logsumexp must have shape {tuple(lead)}")

    teacher = upcast(teacher_topk_logits.detach())
    if cross_tokenizer:
        ids = _student_topk_ids(student_logits, top_k, vocab_start, group)
        teacher = torch.sort(teacher, dim=-1, descending=True).values
    else:
        if teacher_topk_ids is None or teacher_topk_ids.shape != teacher_topk_logits.shape:
            raise ValueError("teacher_topk_ids must be given, with the shape of the logits")
        ids = teacher_topk_ids.long()
    cdt = compute_dtype(student_logits.dtype)
    teacher = teacher.to(cdt)

    if teacher_logsumexp is None:
        picked = _GatherColumns.apply(student_logits, ids, vocab_start, group).to(cdt)
        if student_scale != 1.0:
            picked = student_scale * picked
        if teacher_scale != 1.0:
            teacher = teacher_scale * teacher
        log_q = torch.log_softmax(picked, dim=-1)
        log_p = torch.log_softmax(teacher, dim=-1)
        p = log_p.exp()
    else:
        log_q = _TopKTailLogProbs.apply(student_logits, ids, student_scale, vocab_start, group)
        log_p_ids = teacher - teacher_logsumexp.detach().to(cdt).unsqueeze(-1)
        p_ids = log_p_ids.exp()
        p_tail = (1.0 - p_ids.sum(dim=-1)).clamp(min=0.0)
        p_tail = torch.where(torch.isneginf(log_q[..., top_k]), torch.zeros_like(p_tail), p_tail)
        log_p_tail = torch.log(p_tail.clamp(min=torch.finfo(cdt).tiny))
        p = torch.cat([p_ids, p_tail.unsqueeze(-1)], dim=-1)
        log_p = torch.cat([log_p_ids, log_p_tail.unsqueeze(-1)], dim=-1)
    return _divergence(p, log_p, log_q, divergence)
