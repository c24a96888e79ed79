"""Token and sequence log-probabilities, memory-lean and vocabulary-parallel.

``token_logps`` equals ``log_softmax(logits).gather(labels)`` in value and gradient but keeps
only the logits (which the caller holds anyway) for backward, plus one float per token over a
vocabulary-parallel group; the softmax is recomputed chunk by chunk when the gradient is needed.
``chunked_linear_logps`` goes one step further and never materialises the ``[N, V]`` logits.

Dtypes: arithmetic runs in float32 for float32/bfloat16/float16 inputs and in float64 for
float64 inputs; the returned log-probs are in that compute dtype (float32 for half-precision
inputs, so that per-sequence sums do not lose precision). Gradients come back in the input dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from align_losses._common import Workspace, compute_dtype, gradient_row_chunks, row_chunks
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
    """``log_softmax(logits)[label]`` saving only the logits and the labels.

    Forward and backward walk the rows a chunk at a time with torch's fused ``log_softmax`` /
    ``softmax`` kernels writing into one reused buffer (backward writes straight into the
    gradient when the dtypes allow). Over a vocabulary-parallel group the local softmax is
    rescaled by ``exp(local lse − global lse)``, one float per token.
    """

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
        num_rows = flat_labels.shape[0]
        valid = flat_labels != ignore_index
        columns, owned = owned_columns(flat_labels, vocab_start, vocab_local)
        owned = owned & valid

        log_probs = torch.empty(num_rows, dtype=cdt, device=logits.device)
        if group is not None:
            shift = torch.empty_like(log_probs)
            log_sum = torch.empty_like(log_probs)
        work = Workspace(vocab_local, cdt, logits.device)
        for rows, chunk in row_chunks(logits):
            buf = work.rows(chunk.shape[0])
            torch.log_softmax(chunk, -1, dtype=cdt, out=buf)
            if group is None:
                log_probs[rows] = buf.gather(1, columns[rows].unsqueeze(1)).squeeze(1)
            else:
                # log_softmax at the row max is exactly −log Σ exp(z − max). A slice row of
                # −inf only (e.g. padded vocabulary) contributes nothing to the global sum.
                row_max = chunk.amax(dim=-1).to(cdt)
                empty = torch.isneginf(row_max)
                shift[rows] = torch.where(empty, torch.zeros_like(row_max), row_max)
                log_sum[rows] = torch.where(empty, row_max, buf.amax(dim=-1).neg_())
        del work

        if group is None:
            factor = None
        else:
            global_shift, global_log_sum = combine_logsumexp(shift, log_sum, group)
            target = gather_owned(
                logits, columns.view(*labels.shape, 1), owned.view(*labels.shape, 1), group
            )
            log_probs = (target.reshape(-1).to(cdt) - global_shift) - global_log_sum
            # softmax over the whole vocabulary = local softmax · exp(local lse − global lse)
            factor = torch.exp((shift - global_shift) + (log_sum - global_log_sum))
        out = torch.where(valid, log_probs, torch.zeros_like(log_probs))

        ctx.save_for_backward(logits, columns, owned, valid, factor)
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        logits, columns, owned, valid, factor = ctx.saved_tensors
        cdt = compute_dtype(logits.dtype)
        g = grad_out.reshape(-1).to(cdt)
        g = torch.where(valid, g, torch.zeros_like(g))
        g_target = torch.where(owned, g, torch.zeros_like(g)).unsqueeze(1)
        coef = (-g if factor is None else -g * factor).unsqueeze(1)
        # Slice rows without any finite logit have a NaN local softmax and no share of the mass.
        dead = None if factor is None else (factor == 0).unsqueeze(1)

        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for rows, chunk, buf in gradient_row_chunks(grad, logits, cdt):
            # d log p_y / d z_v = 1[v = y] − softmax(z)_v, times the upstream gradient.
            torch.softmax(chunk, -1, dtype=cdt, out=buf)
            buf.mul_(coef[rows])
            if dead is not None:
                buf.masked_fill_(dead[rows], 0.0)
            buf.scatter_add_(1, columns[rows].unsqueeze(1), g_target[rows])
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
    keeps only ``logits`` (no ``[..., V]`` log-softmax or softmax) and the labels, and
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
    """Token log-probs from hidden states and the output weight, a chunk of tokens at a time.

    Each chunk's logits are written into one reused ``[chunk_size, V]`` buffer (matmul with
    ``out=``) and turned into log-sum-exps / softmax gradients in place.

    With ``precompute`` (a frozen ``weight``, unsharded, gradient wanted for ``hidden`` only) the
    forward pass also forms ``e = (softmax − onehot) W`` per chunk from the logits it already
    holds and keeps it (``[N, H]``, the size of ``hidden``); backward is then ``−g·e`` with no
    matmul, instead of recomputing the logits and multiplying again.

    With ``keep`` (every token in one chunk) the chunk's ``exp(z − local max)`` stays in its
    buffer from forward to backward, which rescales it into the softmax instead of recomputing
    the logits (one ``N×H×V`` matmul fewer). A second backward through the same graph
    (``retain_graph``) recomputes, as the first one consumed the buffer.
    """

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
        precompute: bool,
        keep: bool,
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
        # precompute: e = (softmax − onehot) W per token, so that d log p / d h = −e.
        grad_basis = minus_one = None
        if precompute:
            grad_basis = torch.empty_like(hidden)
            minus_one = torch.full((min(chunk_size, num_tokens), 1), -1.0, dtype=cdt)
            minus_one = minus_one.to(hidden.device)
        work = Workspace(vocab_local, cdt, hidden.device)
        low = None if cdt == hidden.dtype else Workspace(vocab_local, hidden.dtype, hidden.device)
        for start in range(0, num_tokens, chunk_size):
            rows = slice(start, min(start + chunk_size, num_tokens))
            logits = _chunk_logits(hidden[rows], weight, work, low)
            target[rows] = logits.gather(1, columns[rows].unsqueeze(1)).squeeze(1)
            row_max = logits.amax(dim=1, keepdim=True)
            shift[rows] = row_max.squeeze(1)
            total = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)
            log_sum[rows] = total.log().squeeze(1)
            if keep:  # one chunk: logits is exp(z − local max) of every token
                ctx.kept, ctx.local_max = logits, shift.clone()
            if grad_basis is not None and minus_one is not None:
                # Unsharded here, so every label column is in ``logits`` (ignored rows get a
                # harmless −1 at column 0: their upstream gradient is zeroed in backward).
                probs = logits.div_(total)
                probs.scatter_add_(1, columns[rows].unsqueeze(1), minus_one[: probs.shape[0]])
                if low is not None:
                    probs = low.rows(probs.shape[0]).copy_(probs)
                torch.mm(probs, weight, out=grad_basis[rows])
        del work, low
        if not keep:
            ctx.kept = ctx.local_max = None
        target = torch.where(owned, target, torch.zeros_like(target))
        shift, log_sum = combine_logsumexp(shift, log_sum, group)
        target = all_reduce(target, dist.ReduceOp.SUM, group)
        out = torch.where(valid, (target - shift) - log_sum, torch.zeros_like(shift))

        if grad_basis is not None:
            ctx.save_for_backward(grad_basis, valid)
        else:
            ctx.save_for_backward(hidden, weight, columns, owned, valid, shift, log_sum)
        ctx.precompute = grad_basis is not None
        ctx.chunk_size = chunk_size
        ctx.group = group
        return out

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None, None, None, None, None]:
        if ctx.precompute:
            grad_basis, valid = ctx.saved_tensors
            cdt = compute_dtype(grad_basis.dtype)
            neg_g = torch.where(valid, grad_out.to(cdt).neg(), torch.zeros((), dtype=cdt))
            grad_hidden = (grad_basis * neg_g.unsqueeze(1)).to(grad_basis.dtype)
            return grad_hidden, None, None, None, None, None, None, None, None
        hidden, weight, columns, owned, valid, shift, log_sum = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens = hidden.shape[0]
        vocab_local = weight.shape[0]
        cdt = shift.dtype
        g = torch.where(valid, grad_out.to(cdt), torch.zeros_like(shift))
        g_target = torch.where(owned, g, torch.zeros_like(g)).unsqueeze(1)
        neg_g = g.neg().unsqueeze(1)
        shift, log_sum = shift.unsqueeze(1), log_sum.unsqueeze(1)

        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Half-precision weight gradients are accumulated across chunks in float32. The first
        # chunk writes the buffer (no zero fill of a [V, H] tensor), later ones add to it.
        grad_weight = None
        if need_weight:
            alloc = torch.empty if num_tokens > 0 else torch.zeros
            grad_weight = alloc(weight.shape, dtype=cdt, device=weight.device)
        work = Workspace(vocab_local, cdt, hidden.device)
        low = None if cdt == hidden.dtype else Workspace(vocab_local, hidden.dtype, hidden.device)
        partial = None
        kept, ctx.kept = ctx.kept, None
        local_max = ctx.local_max
        for start in range(0, num_tokens, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, num_tokens))
            h = hidden[rows]
            if local_max is not None:  # one chunk, kept from forward (recomputed the same way
                # when a retained graph runs backward again): exp(z − local max), times
                # exp(local max − shift − log_sum), is the softmax.
                if kept is None:
                    kept = _chunk_logits(h, weight, work, low)
                    kept.sub_(local_max.unsqueeze(1)).exp_()
                d = kept.mul_(((local_max.unsqueeze(1) - shift) - log_sum).exp_().mul_(neg_g))
            else:
                d = _chunk_logits(h, weight, work, low)
                # g·(onehot − softmax), with softmax = exp((z − shift) − log_sum).
                d.sub_(shift[rows]).sub_(log_sum[rows]).exp_().mul_(neg_g[rows])
            d.scatter_add_(1, columns[rows].unsqueeze(1), g_target[rows])
            if low is not None:
                d = low.rows(d.shape[0]).copy_(d)
            if grad_hidden is not None:
                torch.mm(d, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                if low is None and start == 0:
                    torch.mm(d.t(), h, out=grad_weight)
                elif low is None:
                    grad_weight.addmm_(d.t(), h)
                else:
                    partial = torch.mm(d.t(), h, out=partial)
                    if start == 0:
                        grad_weight.copy_(partial)
                    else:
                        grad_weight.add_(partial)
        del work, low, partial, kept
        if grad_hidden is not None:
            all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _chunk_logits(hidden: Tensor, weight: Tensor, work: Workspace, low: Workspace | None) -> Tensor:
    """``hidden @ weight.T`` in the input dtype, returned in the compute dtype in ``work``."""
    if low is None:
        return torch.mm(hidden, weight.t(), out=work.rows(hidden.shape[0]))
    logits = torch.mm(hidden, weight.t(), out=low.rows(hidden.shape[0]))
    return work.rows(hidden.shape[0]).copy_(logits)


def chunked_linear_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    group: ProcessGroup | None = None,
    vocab_start: int = 0,
    keep_single_chunk: bool = False,
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

    Cost with both gradients: four ``N×H×V`` matmuls (forward logits; in backward the recomputed
    logits, ``∂/∂h`` and ``∂/∂W``) against three for the dense version. The recompute cannot be
    avoided without keeping ``[N, V]``: the upstream gradient is per token and unknown in forward,
    and ``∂/∂W = Σ_n g_n (onehot_n − p_n)ᵀ h_n`` mixes it with every softmax row. When
    ``weight`` is frozen (``requires_grad=False``, no ``group``, gradients enabled), ``∂/∂h =
    −g·(p − onehot) W`` is formed in forward instead, a chunk at a time from the logits already
    at hand, and kept (``[N, H]``, the size of ``hidden``): two matmuls in all, as many as the
    dense version, and backward does no matmul. That forward matmul is spent even if backward
    never runs; call under ``torch.no_grad()`` for forward-only use. With ``keep_single_chunk``
    and at most ``chunk_size`` tokens, the one chunk's exponentiated logits are kept for backward
    instead of recomputed: three matmuls, like the dense version, in the memory of one chunk.

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
        keep_single_chunk: when all tokens fit in one chunk (``N <= chunk_size``) and gradients
            are wanted, keep that chunk's exponentiated logits (``[N, V]`` floats, the buffer
            backward would otherwise allocate and refill) from forward to backward instead of
            recomputing them: three ``N×H×V`` matmuls instead of four. The peak is unchanged
            when backward follows each call (one call per micro-batch, then its backward); a
            caller that runs several calls before one backward holds one such block per call.

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
    # A frozen output layer (e.g. adapters elsewhere): the hidden-state gradient is formed in
    # forward from the logits already at hand, saving backward's recompute and matmul.
    precompute = (
        group is None
        and torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
    )
    keep = (
        keep_single_chunk
        and not precompute
        and torch.is_grad_enabled()
        and (hidden.requires_grad or weight.requires_grad)
        and 0 < labels.numel() <= chunk_size
    )
    out = _ChunkedLinearLogps.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        ignore_index,
        chunk_size,
        group,
        vocab_start,
        precompute,
        keep,
    )
    return out.view(labels.shape)
