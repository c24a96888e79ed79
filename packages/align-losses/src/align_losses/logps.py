"""Token and sequence log-probabilities, memory-lean and vocabulary-parallel.

``token_logps`` equals ``log_softmax(logits).gather(labels)`` in value and gradient but keeps
only the logits (which the caller holds anyway) and two floats per token (the log-sum-exp, kept
as a shift and a log-sum) for backward; the softmax is recomputed chunk by chunk when the
gradient is needed. ``chunked_linear_logps`` goes
one step further and never materialises the ``[N, V]`` logits at all.

Dtypes: arithmetic runs in float32 for float32/bfloat16/float16 inputs and in float64 for
float64 inputs; the returned log-probs are in that compute dtype (float32 for half-precision
inputs, so that per-sequence sums do not lose precision). Gradients come back in the input dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from align_losses._common import compute_dtype, logsumexp_parts, row_chunks
from align_losses._vocab_parallel import (
    ProcessGroup,
    all_reduce,
    combine_logsumexp,
    gather_owned,
    owned_columns,
)

__all__ = ["chunked_linear_logps", "sequence_logps", "token_logps"]


def _check_labels(labels: Tensor) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


class _TokenLogps(torch.autograd.Function):
    """``log_softmax(logits)[label]`` saving only logits, labels and the log-sum-exp."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        labels: Tensor,
        ignore_index: int,
        group: ProcessGroup | None,
        vocab_start: int,
    ) -> Tensor:
        vocab_local = logits.shape[-1]
        cdt = compute_dtype(logits.dtype)
        flat_labels = labels.reshape(-1)
        valid = flat_labels != ignore_index
        columns, owned = owned_columns(flat_labels, vocab_start, vocab_local)
        owned = owned & valid

        shift = torch.empty(flat_labels.shape[0], dtype=cdt, device=logits.device)
        log_sum = torch.empty_like(shift)
        for rows, chunk in row_chunks(logits):
            shift[rows], log_sum[rows] = logsumexp_parts(chunk.to(cdt))
        shift, log_sum = combine_logsumexp(shift, log_sum, group)

        target = gather_owned(
            logits, columns.view(*labels.shape, 1), owned.view(*labels.shape, 1), group
        )
        target = target.reshape(-1).to(cdt)
        out = torch.where(valid, (target - shift) - log_sum, torch.zeros_like(shift))

        ctx.save_for_backward(logits, columns, owned, valid, shift, log_sum)
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        logits, columns, owned, valid, shift, log_sum = ctx.saved_tensors
        vocab_local = logits.shape[-1]
        cdt = shift.dtype
        g = grad_out.reshape(-1).to(cdt)
        g = torch.where(valid, g, torch.zeros_like(g))
        g_target = torch.where(owned, g, torch.zeros_like(g)).unsqueeze(1)

        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad.view(-1, vocab_local)
        direct = cdt == logits.dtype
        for rows, chunk in row_chunks(logits, buffers=1 if direct else 2):
            out = grad_rows[rows]
            buf = out if direct else torch.empty(out.shape, dtype=cdt, device=out.device)
            # d log p_y / d z_v = 1[v = y] − softmax(z)_v, times the upstream gradient.
            torch.sub(chunk, shift[rows].unsqueeze(1), out=buf)
            buf.sub_(log_sum[rows].unsqueeze(1)).exp_().mul_(-g[rows].unsqueeze(1))
            buf.scatter_add_(1, columns[rows].unsqueeze(1), g_target[rows])
            if not direct:
                out.copy_(buf)
        return grad, None, None, None, None


def token_logps(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    group: ProcessGroup | None = None,
    vocab_start: int = 0,
) -> Tensor:
    r"""Log-probability of each label under the logits at the same position.

    .. math:: \log p_t = z_{t, y_t} - \log \sum_v \exp z_{t, v}

    and 0 where ``y_t == ignore_index``. Labels must already be aligned with the logits (for a
    causal LM: ``logits[:, :-1]`` with ``labels[:, 1:]``). The result equals
    ``log_softmax(logits, -1).gather(-1, labels)`` in value and gradient, but the backward pass
    keeps only ``logits`` (no ``[..., V]`` log-softmax or softmax) plus two floats per token, and
    recomputes the softmax a chunk of rows at a time.

    Vocabulary parallelism (Megatron-LM, https://arxiv.org/abs/1909.08053): with ``group`` set,
    ``logits`` is this rank's slice ``[vocab_start, vocab_start + V_local)`` of the vocabulary
    and ``labels`` are global ids. The max, the sum of exponentials and the target logit are
    all-reduced over ``group``; values and gradients equal the unsharded call, and the gradient
    of each rank's slice is the matching slice of the unsharded gradient.

    Labels outside ``[0, V)`` other than ``ignore_index`` are not checked (checking would need a
    host synchronisation); their result is undefined.

    Args:
        logits: ``[..., T, V]`` (or ``[..., T, V_local]`` with ``group``), any float dtype; may
            be non-contiguous (``logits[:, :-1]`` is not copied).
        labels: ``[..., T]`` integer token ids.
        ignore_index: label value that marks positions to skip.
        group: process group the vocabulary is sharded over, or None for unsharded logits.
        vocab_start: first global vocabulary id of this rank's slice.

    Returns:
        ``[..., T]`` log-probabilities in float32 (float64 for float64 logits).

    Raises:
        ValueError: if the shapes of ``logits`` and ``labels`` do not match.
        TypeError: if ``labels`` is not an integer tensor.
    """
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} plus a vocabulary "
            "dimension"
        )
    _check_labels(labels)
    return _TokenLogps.apply(logits, labels, ignore_index, group, vocab_start)


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    average: bool = False,
    group: ProcessGroup | None = None,
    vocab_start: int = 0,
) -> Tensor:
    r"""Per-sequence sum (or mean) of token log-probabilities over non-ignored tokens.

    .. math:: \log \pi(y \mid x) = \sum_t m_t \log p_t, \qquad
              \text{average: } \frac{\sum_t m_t \log p_t}{\max(\sum_t m_t, 1)}

    with :math:`m_t = [y_t \ne \text{ignore\_index}]` and :math:`\log p_t` from
    :func:`token_logps`. A sequence with no scored token gives 0 in both modes (never NaN). This is
    the ``logps`` input of the preference and KTO losses, and ``-sequence_logps`` is the SFT
    negative log-likelihood.

    Args:
        logits: ``[..., T, V]`` logits (or this rank's vocabulary slice with ``group``).
        labels: ``[..., T]`` integer token ids aligned with ``logits``.
        ignore_index: label value that marks positions to skip.
        average: divide by the number of scored tokens instead of summing.
        group: process group the vocabulary is sharded over, or None.
        vocab_start: first global vocabulary id of this rank's slice.

    Returns:
        ``[...]`` per-sequence log-probabilities in float32 (float64 for float64 logits).
    """
    per_token = token_logps(
        logits, labels, ignore_index=ignore_index, group=group, vocab_start=vocab_start
    )
    total = per_token.sum(dim=-1)
    if not average:
        return total
    count = (labels != ignore_index).sum(dim=-1).clamp(min=1).to(total.dtype)
    return total / count


class _ChunkedLinearLogps(torch.autograd.Function):
    """Token log-probs from hidden states and the output weight, a chunk of tokens at a time."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        ignore_index: int,
        chunk_size: int,
        group: ProcessGroup | None,
        vocab_start: int,
    ) -> Tensor:
        num_tokens = hidden.shape[0]
        vocab_local = weight.shape[0]
        cdt = compute_dtype(hidden.dtype)
        valid = labels != ignore_index
        columns, owned = owned_columns(labels, vocab_start, vocab_local)
        owned = owned & valid

        shift = torch.empty(num_tokens, dtype=cdt, device=hidden.device)
        log_sum = torch.empty_like(shift)
        target = torch.empty_like(shift)
        for start in range(0, num_tokens, chunk_size):
            rows = slice(start, min(start + chunk_size, num_tokens))
            logits = (hidden[rows] @ weight.t()).to(cdt)
            shift[rows], log_sum[rows] = logsumexp_parts(logits)
            target[rows] = logits.gather(1, columns[rows].unsqueeze(1)).squeeze(1)
            del logits
        target = torch.where(owned, target, torch.zeros_like(target))
        shift, log_sum = combine_logsumexp(shift, log_sum, group)
        target = all_reduce(target, dist.ReduceOp.SUM, group)
        out = torch.where(valid, (target - shift) - log_sum, torch.zeros_like(shift))

        ctx.save_for_backward(hidden, weight, columns, owned, valid, shift, log_sum)
        ctx.chunk_size = chunk_size
        ctx.group = group
        return out

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None, None, None]:
        hidden, weight, columns, owned, valid, shift, log_sum = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens = hidden.shape[0]
        cdt = shift.dtype
        g = torch.where(valid, grad_out.to(cdt), torch.zeros_like(shift))
        g_target = torch.where(owned, g, torch.zeros_like(g)).unsqueeze(1)

        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Half-precision weight gradients are accumulated across chunks in float32.
        grad_weight = (
            torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_weight else None
        )
        for start in range(0, num_tokens, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, num_tokens))
            h = hidden[rows]
            d = (h @ weight.t()).to(cdt)
            d.sub_(shift[rows].unsqueeze(1)).sub_(log_sum[rows].unsqueeze(1)).exp_()
            d.mul_(-g[rows].unsqueeze(1))
            d.scatter_add_(1, columns[rows].unsqueeze(1), g_target[rows])
            d = d.to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(d, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                if grad_weight.dtype == weight.dtype:
                    grad_weight.addmm_(d.t(), h)
                else:
                    grad_weight.add_(d.t() @ h)
            del d
        if grad_hidden is not None:
            all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_linear_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    group: ProcessGroup | None = None,
    vocab_start: int = 0,
) -> Tensor:
    r"""Token log-probabilities straight from final hidden states, never materialising logits.

    .. math:: z_n = W h_n, \qquad \log p_n = z_{n, y_n} - \log \sum_v \exp z_{n, v}

    (0 where ``y_n == ignore_index``). Tokens are processed ``chunk_size`` at a time: the forward
    pass keeps two floats per token (the log-sum-exp); the backward pass recomputes each chunk's
    logits, forms ``g·(onehot − softmax)`` and accumulates ``∂/∂h = (…) W`` and ``∂/∂W = (…)ᵀ h``.
    Peak extra memory is one ``[chunk_size, V]`` block plus the weight gradient, instead of
    several ``[N, V]`` tensors; the price is one extra matmul (the logits are recomputed in
    backward). Values and gradients to ``hidden`` and ``weight`` equal
    ``token_logps(hidden @ weight.T, labels)``. The technique is the fused linear cross-entropy
    of Liger-Kernel (https://arxiv.org/abs/2410.10989), written here per token.

    With ``group`` (vocabulary parallelism), ``weight`` is this rank's rows
    ``[vocab_start, vocab_start + V_local)`` of the output embedding and ``hidden`` is replicated
    over ``group``. The log-sum-exp and target logit are all-reduced in forward; in backward the
    gradient to ``hidden`` is all-reduced (summed) over ``group`` so that it equals the unsharded
    gradient on every rank. Do not also wrap ``hidden`` in Megatron's
    ``copy_to_tensor_model_parallel_region``, which would sum it a second time.

    Args:
        hidden: ``[..., H]`` final hidden states, any float dtype (matmuls run in this dtype).
        weight: ``[V, H]`` output embedding (``[V_local, H]`` with ``group``), same dtype.
        labels: ``[...]`` integer token ids aligned with ``hidden``.
        chunk_size: number of tokens per chunk; memory scales with ``chunk_size × V``.
        ignore_index: label value that marks positions to skip.
        group: process group the vocabulary is sharded over, or None.
        vocab_start: first global vocabulary id of this rank's rows of ``weight``.

    Returns:
        ``[...]`` log-probabilities in float32 (float64 for float64 inputs).

    Raises:
        ValueError: on mismatched shapes or a non-positive ``chunk_size``.
        TypeError: if ``labels`` is not an integer tensor.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [..., H] and "
            "[V, H]"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be labels {tuple(labels.shape)} plus a hidden "
            "dimension"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    _check_labels(labels)
    out = _ChunkedLinearLogps.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        ignore_index,
        chunk_size,
        group,
        vocab_start,
    )
    return out.view(labels.shape)
