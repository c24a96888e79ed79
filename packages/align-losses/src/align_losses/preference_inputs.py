r"""What goes into a preference loss besides plain sums: LD-DPO log-probs, WPO weights, masking.

* **LD-DPO** (length desensitisation) rewrites a sequence log-prob before the loss: the tokens
  up to the pair's shared length :math:`l_p = \min(|y_c|, |y_r|)` count fully, the excess tokens of
  the longer response with weight α. :func:`split_at_shared_length` splits per-token log-probs
  into the two per-sequence sums, :func:`ld_logps` recombines them; feed the result to any loss
  of the family in place of the plain sums.
* **WPO** (weighted preference optimisation) multiplies each pair's loss by a detached weight
  that measures how likely the pair is under the current policy: :func:`wpo_weights`, optionally
  with the per-token correction of :func:`wpo_token_adjustment`.
* :func:`masked_mean` averages per-pair losses over valid pairs only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align_losses._common import compute_dtype, row_chunks, upcast
from align_losses._vocab_parallel import ProcessGroup, combine_logsumexp

__all__ = [
    "ld_logps",
    "masked_mean",
    "split_at_shared_length",
    "wpo_token_adjustment",
    "wpo_weights",
]


def split_at_shared_length(
    token_logps: Tensor, segment_ids: Tensor, shared_lengths: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Per-sequence sums of token log-probs over the first ``l_p`` scored tokens and the rest.

    Works for padded batches (one sequence per row) and packed ones (several per row) alike: a
    sequence's tokens are those whose ``segment_ids`` equal its index, taken in row-major order.

    Args:
        token_logps: ``[..., T]`` per-token log-probs (differentiable).
        segment_ids: integer tensor of the same shape: the sequence index of each scored token,
            negative where the token is not scored (prompt, padding).
        shared_lengths: ``[N]`` how many leading scored tokens of each sequence go into the
            shared part; for LD-DPO ``min(|y_c|, |y_r|)`` of the sequence's pair.

    Returns:
        ``(shared, excess)``, each ``[N]``: sums over each sequence's first ``shared_lengths``
        scored tokens, and over its remaining scored tokens. ``shared + excess`` is the plain
        per-sequence sum.
    """
    if token_logps.shape != segment_ids.shape:
        raise ValueError("token_logps and segment_ids must have one shape")
    values = upcast(token_logps).reshape(-1)
    seg = segment_ids.reshape(-1).long()
    num = shared_lengths.numel()
    keep = seg >= 0
    safe = torch.where(keep, seg, torch.full_like(seg, num))  # unscored → a spill bucket
    # Rank of each scored token within its sequence: a stable sort groups the sequences and
    # keeps their tokens in order; rank = position − position of the sequence's first token.
    order = torch.sort(safe, stable=True).indices
    sorted_seg = safe[order]
    positions = torch.arange(seg.numel(), device=seg.device)
    first = torch.full((num + 1,), seg.numel(), dtype=torch.long, device=seg.device)
    first = first.scatter_reduce(0, sorted_seg, positions, reduce="amin")
    rank = torch.empty_like(seg)
    rank[order] = positions - first[sorted_seg]
    limit = torch.cat([shared_lengths.reshape(-1).long(), shared_lengths.new_zeros(1).long()])
    in_shared = rank < limit[safe]
    zero = torch.zeros_like(values)
    buckets = values.new_zeros(num + 1)
    shared = buckets.index_add(0, safe, torch.where(keep & in_shared, values, zero))
    excess = buckets.index_add(0, safe, torch.where(keep & ~in_shared, values, zero))
    return shared[:num], excess[:num]


def ld_logps(shared_logps: Tensor, excess_logps: Tensor, *, ld_alpha: float) -> Tensor:
    r"""LD-DPO's length-desensitised sequence log-prob.

    .. math:: \hat\pi(y) = \sum_{t \le l_p}\log p_t + \alpha\sum_{t > l_p}\log p_t

    Liu et al., 2024, "Length Desensitization in Direct Preference Optimization",
    https://arxiv.org/abs/2409.06411. ``l_p`` is the pair's shared length
    (:func:`split_at_shared_length`); the shorter response of a pair has no excess, so only the
    longer one is scaled. α = 1 gives the plain sum (DPO), α = 0 compares equal-length prefixes.
    Apply it to the policy's log-probs; TRL's ``ld_alpha`` leaves the reference's unchanged, and
    applying it to both is the alternative reading (call it on the reference sums as well).

    Args:
        shared_logps: ``[N]`` sums over the first ``l_p`` scored tokens.
        excess_logps: ``[N]`` sums over the remaining scored tokens.
        ld_alpha: α in ``[0, 1]``.

    Returns:
        ``[N]`` desensitised log-probs, differentiable in both inputs.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    return upcast(shared_logps) + ld_alpha * upcast(excess_logps)


@torch.no_grad()
def wpo_token_adjustment(logits: Tensor, *, group: ProcessGroup | None = None) -> Tensor:
    r"""WPO's per-token correction :math:`\log\sum_v p_v^2` of the policy's next-token distribution.

    .. math:: \log\sum_v p_v^2 = \operatorname{lse}(2z) - 2\operatorname{lse}(z)

    Subtracting it from each token log-prob (:func:`wpo_weights`' "weight alignment" form)
    measures a token's probability relative to what greedy-ish sampling from the policy would
    give, instead of relative to 1. Computed without gradient, a chunk of rows at a time; with
    ``group`` the logits are this rank's vocabulary shard and the result is the global one.

    Args:
        logits: ``[..., V]`` (or ``[..., V / TP]`` over ``group``) policy logits.
        group: the tensor-parallel group the vocabulary is sharded over, or None.

    Returns:
        ``[...]`` per-token values (≤ 0) in the compute dtype, detached.
    """
    cdt = compute_dtype(logits.dtype)
    out = torch.empty(logits.shape[:-1], dtype=cdt, device=logits.device).reshape(-1)
    shift = torch.empty_like(out)
    log_sum = torch.empty_like(out)
    log_sum_sq = torch.empty_like(out)
    for rows, chunk in row_chunks(logits, buffers=2):
        z = chunk.to(cdt)
        top = z.amax(-1)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        centred = z - top.unsqueeze(-1)
        shift[rows] = top
        log_sum[rows] = torch.logsumexp(centred, -1)
        log_sum_sq[rows] = torch.logsumexp(2.0 * centred, -1)
    s1, l1 = combine_logsumexp(shift, log_sum, group)
    s2, l2 = combine_logsumexp(2.0 * shift, log_sum_sq, group)
    out = (s2 + l2) - 2.0 * (s1 + l1)
    return out.reshape(logits.shape[:-1])


def wpo_weights(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    max_weight: float = 1.0,
) -> Tensor:
    r"""WPO's off-policy weight of each pair, detached.

    .. math::
        w = \min\Big(\exp\Big(\frac{\pi_c}{|y_c|} + \frac{\pi_r}{|y_r|}\Big),\; w_{max}\Big)

    Zhou et al., 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
    https://arxiv.org/abs/2406.11827, Eq. 2: the product of the two responses' length-normalised
    probabilities under the *current* policy, so pairs the policy would itself produce weigh
    more. Multiply each pair's loss by it (``preference_loss(..., pair_weights=w)``). With plain
    token log-probs the weight is ≤ 1 anyway; with the "weight alignment" form, pass sums of
    ``token_logps − wpo_token_adjustment(logits)``, which can exceed 1 and are clamped at
    ``max_weight`` as TRL does.

    Args:
        policy_chosen_logps: ``[B]`` summed policy log-probs of the chosen responses (adjusted
            or not).
        policy_rejected_logps: ``[B]`` same for the rejected responses.
        chosen_lengths: ``[B]`` scored tokens of each chosen response (clamped at 1).
        rejected_lengths: ``[B]`` scored tokens of each rejected response (clamped at 1).
        max_weight: upper clamp of the weight.

    Returns:
        ``[B]`` detached weights in the compute dtype.
    """
    chosen = upcast(policy_chosen_logps).detach()
    rejected = upcast(policy_rejected_logps).detach()
    len_c = chosen_lengths.to(chosen.dtype).clamp(min=1.0)
    len_r = rejected_lengths.to(chosen.dtype).clamp(min=1.0)
    return torch.exp(chosen / len_c + rejected / len_r).clamp(max=max_weight)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the entries where ``mask`` is true; 0 when none is.

    The masked-out entries are replaced (``torch.where``) *after* the loss was computed (after
    the log-sigmoid), so padding pairs with meaningless log-probs contribute neither to the value
    (even where their loss is inf or NaN) nor to the gradient (they receive an exact zero, which
    stays zero through any loss whose local derivative is finite there, as the log-sigmoid's is
    at every margin, ±inf included), and the mean is over valid entries only.

    Args:
        values: per-example values, e.g. ``PreferenceOutput.losses``.
        mask: bool tensor of the same shape, true for valid examples.

    Returns:
        Scalar mean over the valid entries (no host sync).
    """
    if mask.shape != values.shape:
        raise ValueError("mask must have the shape of values")
    mask = mask.bool()
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() / mask.sum().clamp(min=1).to(values.dtype)
