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

`full_vocab_kd_loss` takes the teacher's full logits instead (on-policy distillation, GKD, with
an online teacher): ``_FullVocabDivergence`` computes the divergence a chunk of rows at a time,
saves the two logits tensors (already alive) and a few floats per token, and recomputes both
softmaxes in backward, so no ``[N, V]`` temporary outlives a chunk. The divergences themselves
(forward/reverse KL, generalised JSD, skewed KLs) are written once, per class, in
``align_losses._divergence``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from align_losses._common import (
    Workspace,
    chunk_rows,
    compute_dtype,
    gradient_row_chunks,
    row_chunks,
    upcast,
)
from align_losses._divergence import (
    MIXTURE_KINDS,
    KDDivergence,
    clamp_log,
    log_mixture,
    pointwise_grad,
    pointwise_terms,
    resolve_divergence,
)
from align_losses._vocab_parallel import (
    ProcessGroup,
    all_gather_cat,
    all_reduce,
    combine_logsumexp,
    gather_owned,
    owned_columns,
)

__all__ = ["KDDivergence", "full_vocab_kd_loss", "topk_kd_loss"]


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
        for rows, chunk, buf in gradient_row_chunks(grad, logits, cdt):
            torch.add(neg_tail_lse[rows], chunk, alpha=scale, out=buf)
            # Tail tokens have z'_v ≤ L_tail; the clamp only keeps id positions finite.
            buf.clamp_(max=0.0).exp_().mul_(tail_coef[rows])
            current = buf.gather(1, columns[rows])
            fix = torch.where(owned[rows], id_grad[rows] - current, torch.zeros_like(current))
            buf.scatter_add_(1, columns[rows], fix)
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


def _check_weights(token_weights: Tensor | None, lead: torch.Size) -> None:
    """Refuse ``token_weights`` whose shape is not the per-token shape ``lead``."""
    if token_weights is not None and token_weights.shape != lead:
        raise ValueError(
            f"token_weights must have shape {tuple(lead)}, got {tuple(token_weights.shape)}"
        )


def _weighted(loss: Tensor, token_weights: Tensor | None) -> Tensor:
    """``loss · token_weights`` (in the loss's dtype), or ``loss`` when there are no weights."""
    return loss if token_weights is None else loss * token_weights.to(loss.dtype)


def topk_kd_loss(
    student_logits: Tensor,
    teacher_topk_logits: Tensor,
    teacher_topk_ids: Tensor | None,
    *,
    divergence: KDDivergence = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
    teacher_logsumexp: Tensor | None = None,
    cross_tokenizer: bool = False,
    token_weights: Tensor | None = None,
    group: ProcessGroup | None = None,
    vocab_start: int = 0,
) -> Tensor:
    r"""Per-token divergence between the teacher's top-K distribution and the student's.

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

    and the same divergence over the K + 1 classes. :math:`q_{tail}` is computed from the tail
    logits themselves (exact even when it is tiny); :math:`p_{tail}` is clamped at 0 and its
    log at the smallest normal float. Where the student's tail is empty (the ids cover its
    whole vocabulary, e.g. K = V) the tail class is dropped.

    Other divergences, over the same K (or K + 1) classes, with the mixture
    :math:`m = \lambda p + (1 - \lambda) q` formed in probability space
    (:math:`\log m = \mathrm{logaddexp}(\log p + \log\lambda, \log q + \log(1-\lambda))`,
    in float32 or float64):

    * ``"jsd"``, the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024,
      https://arxiv.org/abs/2306.13649, eq. 1; TRL's ``generalized_jsd_loss``), :math:`\lambda =
      \beta`: :math:`\beta\,\mathrm{KL}(p \| m) + (1 - \beta)\,\mathrm{KL}(q \| m)`. As in
      GKD and TRL, β = 0 *is* the forward KL and β = 1 the reverse KL (computed as
      ``"forward_kl"`` / ``"reverse_kl"``, bit for bit); for 0 < β < 1 the value tends to 0 at
      both ends, behaving like β·forward KL near β = 0 and (1 − β)·reverse KL near β = 1.
      β = 0.5 is the symmetric Jensen-Shannon divergence.
    * ``"skew_forward_kl"``: :math:`\mathrm{KL}(p \| \alpha p + (1-\alpha) q)` and
      ``"skew_reverse_kl"``: :math:`\mathrm{KL}(q \| (1-\alpha) p + \alpha q)`, α = ``skew``
      (DistiLLM, Ko et al., 2024, https://arxiv.org/abs/2402.03898; α = 0 is the plain KL).
      These are true KLs (0 when p = q): DistiLLM's code drops the teacher entropy from the skew
      forward KL, which changes the value but not the gradient.

    The mixture divergences (including the β and α endpoints) are clamped at 0, so rounding
    never makes them negative; ``"forward_kl"`` and ``"reverse_kl"`` are returned unclamped.

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
        divergence: ``"forward_kl"`` (KL(teacher ‖ student)), ``"reverse_kl"``
            (KL(student ‖ teacher)), ``"jsd"``, ``"skew_forward_kl"`` or ``"skew_reverse_kl"``.
        beta: β of ``"jsd"``, in [0, 1] (the teacher's weight in the mixture).
        skew: α of the skewed KLs, in [0, 1).
        student_scale: :math:`s_s > 0`, multiplies the student logits (an inverse temperature).
        teacher_scale: :math:`s_t > 0`, multiplies the teacher logits.
        teacher_logsumexp: ``[...]`` teacher log-sum-exp over its full vocabulary; turns on the
            tail bucket.
        cross_tokenizer: pair the student's own top-K with the teacher's by rank.
        token_weights: ``[...]`` per-token weights multiplying the per-token divergence (for
            example on-policy importance weights or a mask); gradients flow into them if they
            require grad.
        group: process group the student vocabulary is sharded over, or None.
        vocab_start: first global vocabulary id of this rank's slice.

    Returns:
        ``[...]`` per-token loss in float32 (float64 for float64 student logits), times
        ``token_weights`` when given. Mask padding positions and reduce yourself.

    Raises:
        ValueError: on mismatched shapes, K larger than the vocabulary, non-positive scales, an
            unknown divergence, β or α out of range, or a tail bucket with
            ``teacher_scale != 1``.
    """
    kind, lam = resolve_divergence(divergence, beta, skew)
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
    _check_weights(token_weights, lead)

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
    if divergence in ("forward_kl", "reverse_kl"):
        loss = _divergence(p, log_p, log_q, divergence)
    elif kind in MIXTURE_KINDS:
        log_p, log_q = clamp_log(log_p), clamp_log(log_q)
        terms = pointwise_terms(p, log_p, log_q.exp(), log_q, kind, lam)
        loss = terms.sum(dim=-1).clamp(min=0.0)
    else:  # an endpoint of a mixture divergence: the plain KL, clamped like the mixtures
        loss = _divergence(p, log_p, log_q, kind).clamp(min=0.0)  # type: ignore[arg-type]
    return _weighted(loss, token_weights)


#: Chunk-sized temporaries alive at once while a chunk of the full-vocabulary divergence is
#: computed (both log-probabilities, both probabilities, the log-mixture and a term).
_FULL_BUFFERS = 8


def _paired_row_blocks(
    x: Tensor, y: Tensor, first_row: int = 0
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(first_row, x_rows, y_rows)``: matching 2-D views of two same-shaped ``[..., V]``."""
    if x.dim() <= 2:
        yield first_row, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        return
    try:
        flat_x, flat_y = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    except RuntimeError:
        rows_per_item = x[0].numel() // max(x.shape[-1], 1)
        for i in range(x.shape[0]):
            yield from _paired_row_blocks(x[i], y[i], first_row + i * rows_per_item)
        return
    yield first_row, flat_x, flat_y


def _paired_row_chunks(x: Tensor, y: Tensor) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Row chunks of two same-shaped ``[..., V]`` tensors, without copying either."""
    step = chunk_rows(x, _FULL_BUFFERS)
    for first, block_x, block_y in _paired_row_blocks(x, y):
        for start in range(0, block_x.shape[0], step):
            stop = min(start + step, block_x.shape[0])
            yield slice(first + start, first + stop), block_x[start:stop], block_y[start:stop]


def _row_logsumexp(
    x: Tensor, scale: float, cdt: torch.dtype, group: ProcessGroup | None
) -> tuple[Tensor, Tensor]:
    """Per-row ``(shift, log_sum)`` of ``scale·x`` over the whole (possibly sharded) vocabulary.

    A row whose every logit is ``−inf`` gets ``log_sum = 0`` (its log-probabilities are all
    ``−inf``, i.e. an empty distribution, instead of NaN).
    """
    num_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    shift = torch.empty(num_rows, dtype=cdt, device=x.device)
    log_sum = torch.empty(num_rows, dtype=cdt, device=x.device)
    for rows, chunk in row_chunks(x, buffers=2):
        top = chunk.amax(dim=1).to(cdt) * scale
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        shift[rows] = top
        shifted = torch.add(-top.unsqueeze(1), chunk, alpha=scale)  # in cdt (type promotion)
        log_sum[rows] = shifted.exp_().sum(dim=1).log_()
    shift, log_sum = combine_logsumexp(shift, log_sum, group)
    log_sum = torch.where(torch.isfinite(log_sum), log_sum, torch.zeros_like(log_sum))
    return shift, log_sum


def _chunk_log_probs(
    chunk: Tensor, scale: float, stats: tuple[Tensor, Tensor], rows: slice, cdt: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Probabilities and (finite-clamped) log-probabilities of a chunk of rows."""
    shift, log_sum = stats
    # (scale·z − shift) − log_sum, the shift apart from the log-sum as in log_softmax.
    log_x = torch.add(-shift[rows].unsqueeze(1), chunk, alpha=scale).to(cdt)
    log_x.sub_(log_sum[rows].unsqueeze(1)).clamp_(min=torch.finfo(cdt).min)
    return log_x.exp(), log_x


class _FullVocabDivergence(torch.autograd.Function):
    """Per-row divergence between ``softmax(s_t·t)`` and ``softmax(s_s·z)`` over the vocabulary.

    Forward, per row: both log-sum-exps (combined over the vocabulary shards), then, a chunk of
    rows at a time, ``D = Σ_v f_v`` and ``G = Σ_v g_v`` with ``f``/``g`` the per-class term and
    its derivative in ``log q`` (``align_losses._divergence``), summed over the shards. Backward
    recomputes both softmaxes chunk by chunk: ``∂D/∂z_v = s_s·(g_v − q_v·G)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        kind: str,
        lam: float,
        student_scale: float,
        teacher_scale: float,
        group: ProcessGroup | None,
    ) -> Tensor:
        cdt = torch.promote_types(compute_dtype(student.dtype), compute_dtype(teacher.dtype))
        s_stats = _row_logsumexp(student, student_scale, cdt, group)
        t_stats = _row_logsumexp(teacher, teacher_scale, cdt, group)
        sums = torch.zeros(s_stats[0].shape[0], 2, dtype=cdt, device=student.device)
        for rows, z_s, z_t in _paired_row_chunks(student, teacher):
            q, log_q = _chunk_log_probs(z_s, student_scale, s_stats, rows, cdt)
            p, log_p = _chunk_log_probs(z_t, teacher_scale, t_stats, rows, cdt)
            log_m = log_mixture(log_p, log_q, kind, lam)
            sums[rows, 0] = pointwise_terms(p, log_p, q, log_q, kind, lam, log_m).sum(dim=1)
            sums[rows, 1] = pointwise_grad(p, log_p, q, log_q, kind, lam, log_m).sum(dim=1)
        sums = all_reduce(sums, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(student, teacher, *s_stats, *t_stats, sums[:, 1].contiguous())
        ctx.params = (kind, lam, student_scale, teacher_scale, cdt)
        return sums[:, 0].reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        student, teacher, s_shift, s_sum, t_shift, t_sum, g_sum = ctx.saved_tensors
        kind, lam, student_scale, teacher_scale, cdt = ctx.params
        coef = grad_out.reshape(-1).to(cdt) * student_scale
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        grad_rows = grad.view(-1, student.shape[-1])
        for rows, z_s, z_t in _paired_row_chunks(student, teacher):
            q, log_q = _chunk_log_probs(z_s, student_scale, (s_shift, s_sum), rows, cdt)
            p, log_p = _chunk_log_probs(z_t, teacher_scale, (t_shift, t_sum), rows, cdt)
            g = pointwise_grad(p, log_p, q, log_q, kind, lam)
            g.addcmul_(q, g_sum[rows].unsqueeze(1), value=-1.0).mul_(coef[rows].unsqueeze(1))
            grad_rows[rows] = g
        return grad, None, None, None, None, None, None


def full_vocab_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: KDDivergence = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
    token_weights: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> Tensor:
    r"""Per-token divergence between the teacher's and the student's full-vocabulary softmax.

    .. math::
        p = \mathrm{softmax}(s_t\,t), \qquad q = \mathrm{softmax}(s_s\,z)

    over the whole vocabulary, with the divergences of `topk_kd_loss`: ``"forward_kl"``
    :math:`\mathrm{KL}(p \| q)`, ``"reverse_kl"`` :math:`\mathrm{KL}(q \| p)`, ``"jsd"``
    :math:`\beta\,\mathrm{KL}(p \| m) + (1-\beta)\,\mathrm{KL}(q \| m)` with
    :math:`m = \beta p + (1-\beta) q` (GKD, Agarwal et al., 2024,
    https://arxiv.org/abs/2306.13649, eq. 1, and TRL's ``generalized_jsd_loss``: β = 0 is the
    forward KL, β = 1 the reverse KL, exactly), ``"skew_forward_kl"``
    :math:`\mathrm{KL}(p \| \alpha p + (1-\alpha) q)` and ``"skew_reverse_kl"``
    :math:`\mathrm{KL}(q \| (1-\alpha) p + \alpha q)` (DistiLLM, Ko et al., 2024,
    https://arxiv.org/abs/2402.03898). The mixture is formed in probability space
    (log-add-exp of the log-probabilities plus :math:`\log\beta`, :math:`\log(1-\beta)`) in
    float32 (float64 for float64 logits), and every result is clamped at 0.

    This is the loss of on-policy distillation (GKD): the student's own samples scored by an
    online teacher whose logits are at hand. Memory: nothing ``[..., V]`` is kept for backward
    beyond the two logits tensors themselves (both softmaxes are recomputed a chunk of rows at a
    time); peak extra memory is the ``[..., V]`` student gradient plus a chunk.

    Vocabulary parallelism: with ``group``, both logits tensors are this rank's slice of the
    same vocabulary range (teacher and student sharded alike, e.g. on the same tensor-parallel
    ranks); values and gradients equal the unsharded call.

    Args:
        student_logits: ``[..., V]`` (or ``[..., V_local]``) student logits, any float dtype.
        teacher_logits: Teacher logits of the same shape (treated as constants: no gradient).
        divergence: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"``, ``"skew_forward_kl"`` or
            ``"skew_reverse_kl"``.
        beta: β of ``"jsd"``, in [0, 1] (the teacher's weight in the mixture).
        skew: α of the skewed KLs, in [0, 1).
        student_scale: :math:`s_s > 0`, multiplies the student logits (an inverse temperature).
        teacher_scale: :math:`s_t > 0`, multiplies the teacher logits.
        token_weights: ``[...]`` per-token weights multiplying the per-token divergence.
        group: process group the vocabulary is sharded over, or None.

    Returns:
        ``[...]`` per-token loss in float32 (float64 when either input is float64), times
        ``token_weights`` when given. Mask padding positions and reduce yourself.

    Raises:
        ValueError: on mismatched shapes, non-positive scales, an unknown divergence, or β / α
            out of range.
    """
    kind, lam = resolve_divergence(divergence, beta, skew)
    if not (student_scale > 0 and teacher_scale > 0):
        raise ValueError("student_scale and teacher_scale must be positive")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError("the logits need a non-empty vocabulary dimension")
    _check_weights(token_weights, student_logits.shape[:-1])
    loss = _FullVocabDivergence.apply(
        student_logits, teacher_logits.detach(), kind, lam, student_scale, teacher_scale, group
    )
    return _weighted(loss.clamp(min=0.0), token_weights)
