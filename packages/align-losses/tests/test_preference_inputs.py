"""LD-DPO log-probs, WPO weights, masking of invalid pairs, and the IPO length convention."""

from __future__ import annotations

import math
import socket

import _preference_group_worker
import pytest
import torch
import torch.multiprocessing as mp

from align_losses import (
    dpo_loss,
    ipo_loss,
    ld_logps,
    masked_mean,
    preference_loss,
    sequence_logps,
    split_at_shared_length,
    token_logps,
    wpo_token_adjustment,
    wpo_weights,
)

# --------------------------------------------------------------------------------------------
# LD-DPO


def _loop_split(values: torch.Tensor, segments: torch.Tensor, shared: list[int]):
    """Walk the tokens in row-major order, counting each sequence's scored tokens."""
    n = len(shared)
    seen = [0] * n
    first, rest = [0.0] * n, [0.0] * n
    for v, s in zip(values.reshape(-1).tolist(), segments.reshape(-1).tolist(), strict=True):
        if s < 0:
            continue
        if seen[s] < shared[s]:
            first[s] += v
        else:
            rest[s] += v
        seen[s] += 1
    return torch.tensor(first, dtype=torch.float64), torch.tensor(rest, dtype=torch.float64)


def test_split_padded_layout() -> None:
    # Row i is sequence i: prompt (−1), response, padding (−1).
    seg = torch.tensor(
        [
            [-1, -1, 0, 0, 0, 0, -1],
            [-1, 1, 1, -1, -1, -1, -1],
            [-1, -1, -1, 2, 2, 2, 2],
        ]
    )
    values = -torch.rand(seg.shape, dtype=torch.float64)
    shared = [2, 2, 3]
    got = split_at_shared_length(values, seg, torch.tensor(shared))
    want = _loop_split(values, seg, shared)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-14)
    # shared + excess is the plain sum
    plain = torch.zeros(3, dtype=torch.float64).index_add(
        0, seg.clamp(min=0).reshape(-1), torch.where(seg >= 0, values, 0.0).reshape(-1)
    )
    torch.testing.assert_close(got[0] + got[1], plain)


def test_split_packed_layout_and_gradient() -> None:
    # Two rows, four sequences packed (pairs 0/2 and 1/3 in a chosen-first layout).
    seg = torch.tensor(
        [
            [-1, 0, 0, 0, 0, -1, 2, 2, -1],
            [-1, 1, 1, -1, 3, 3, 3, 3, 3],
        ]
    )
    gen = torch.Generator().manual_seed(0)
    values = -torch.rand(seg.shape, generator=gen, dtype=torch.float64).requires_grad_()
    counts = torch.tensor([4, 2, 2, 5])
    shared = torch.minimum(counts[:2], counts[2:]).repeat(2)  # pair-wise min: [2, 2, 2, 2]
    got = split_at_shared_length(values, seg, shared)
    want = _loop_split(values.detach(), seg, shared.tolist())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-14)
    # d(shared + α·excess)/d(token) is 1 on the shared tokens, α on the excess, 0 elsewhere.
    alpha = 0.3
    (grad,) = torch.autograd.grad(ld_logps(*got, ld_alpha=alpha).sum(), values)
    expected = torch.zeros_like(values)
    for row, s in enumerate(seg.tolist()):
        seen: dict[int, int] = {}
        for col, k in enumerate(s):
            if k >= 0:
                expected[row, col] = 1.0 if seen.get(k, 0) < shared[k] else alpha
                seen[k] = seen.get(k, 0) + 1
    torch.testing.assert_close(grad, expected)


def test_ld_dpo_value_by_hand() -> None:
    # Chosen: 2 tokens [−1, −2]; rejected: 4 tokens [−0.5, −0.5, −1, −3]; l_p = 2; α = 0.5.
    # π̂_c = −3; π̂_r = −1 + 0.5·(−4) = −3. Reference (plain sums): ref_c = −3.5, ref_r = −4.
    # Δ = (−3 + 3.5) − (−3 + 4) = −0.5; loss = log(1 + e^{βΔ·−1}) with β = 1.
    seg = torch.tensor([[0, 0, -1, -1], [1, 1, 1, 1]])
    values = torch.tensor([[-1.0, -2.0, 0.0, 0.0], [-0.5, -0.5, -1.0, -3.0]], dtype=torch.float64)
    shared, excess = split_at_shared_length(values, seg, torch.tensor([2, 2]))
    policy = ld_logps(shared, excess, ld_alpha=0.5)
    torch.testing.assert_close(policy, torch.tensor([-3.0, -3.0], dtype=torch.float64))
    ref = torch.tensor([-3.5, -4.0], dtype=torch.float64)
    out = dpo_loss(policy[:1], policy[1:], ref[:1], ref[1:], beta=1.0)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(0.5)), abs=1e-14)


def test_ld_alpha_one_is_plain_dpo() -> None:
    seg = torch.tensor([[0, 0, 0, -1], [1, 1, 1, 1]])
    values = -torch.rand(seg.shape, dtype=torch.float64)
    shared, excess = split_at_shared_length(values, seg, torch.tensor([3, 3]))
    plain = torch.where(seg >= 0, values, 0.0).sum(-1)
    torch.testing.assert_close(ld_logps(shared, excess, ld_alpha=1.0), plain)
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_logps(shared, excess, ld_alpha=1.5)


# --------------------------------------------------------------------------------------------
# WPO


def test_wpo_weights_formula_and_detached() -> None:
    pc = torch.tensor([-4.0, -30.0, -1.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-6.0, -10.0, 2.0], dtype=torch.float64)  # 2.0: an adjusted sum > 0
    lc, lr = torch.tensor([4, 10, 2]), torch.tensor([3, 5, 1])
    w = wpo_weights(pc, pr, lc, lr)
    expected = [math.exp(-1 - 2), math.exp(-3 - 2), min(math.exp(-0.5 + 2.0), 1.0)]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))
    assert not w.requires_grad
    assert wpo_weights(pc, pr, lc, lr, max_weight=10.0)[2].item() == pytest.approx(math.exp(1.5))


def test_wpo_token_adjustment_is_log_sum_of_squared_probs(small_chunks: int) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    logits[0, 0, :3] = float("-inf")  # masked vocabulary entries
    got = wpo_token_adjustment(logits)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(got, torch.log((p * p).sum(-1)), rtol=1e-12, atol=1e-12)
    big = wpo_token_adjustment(torch.tensor([[1e4, 0.0, -1e4]]))  # one token has all the mass
    assert big.item() == pytest.approx(0.0, abs=1e-6)


def test_wpo_weighted_dpo_through_the_dispatcher() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 9, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 9, (4, 6), generator=gen)
    labels[:, :2] = -100
    tok = token_logps(logits, labels)
    adjusted = torch.where(labels != -100, tok - wpo_token_adjustment(logits), 0.0).sum(-1)
    counts = (labels != -100).sum(-1)
    w = wpo_weights(adjusted[:2], adjusted[2:], counts[:2], counts[2:])
    policy = tok.sum(-1)
    ref = policy.detach() + 0.1
    args = (policy[:2], policy[2:], ref[:2], ref[2:])
    out = preference_loss(
        "sigmoid",
        policy_chosen_logps=args[0],
        policy_rejected_logps=args[1],
        ref_chosen_logps=args[2],
        ref_rejected_logps=args[3],
        pair_weights=w,
    )
    torch.testing.assert_close(out.losses, w * dpo_loss(*args).losses)


# --------------------------------------------------------------------------------------------
# Invalid pairs: masked after the log-sigmoid, averaged over valid pairs only.


def test_invalid_pairs_are_masked_after_the_loss() -> None:
    pc = torch.tensor([-3.0, -1e30, -2.0, float("-inf")], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0, 0.0, -2.5, 0.0], dtype=torch.float64)
    zeros = torch.zeros(4, dtype=torch.float64)
    valid = torch.tensor([True, False, True, False])
    out = dpo_loss(pc, pr, zeros, zeros, beta=0.5)
    assert torch.isinf(out.losses[3])  # garbage pairs do give garbage losses
    loss = masked_mean(out.losses, valid)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-0.25))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-14)
    (grad,) = torch.autograd.grad(loss, pc)
    assert torch.all(grad[~valid] == 0) and torch.isfinite(grad).all()
    # the valid pairs' gradient is that of their mean alone
    sub = pc.detach()[valid].requires_grad_()
    (ref_grad,) = torch.autograd.grad(
        dpo_loss(sub, pr[valid], zeros[:2], zeros[:2], beta=0.5).losses.mean(), sub
    )
    torch.testing.assert_close(grad[valid], ref_grad)


def test_masked_mean_with_no_valid_pair_is_zero() -> None:
    values = torch.tensor([1.0, float("nan")], requires_grad=True)
    loss = masked_mean(values, torch.zeros(2, dtype=torch.bool))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, values)
    assert torch.all(grad == 0)


# --------------------------------------------------------------------------------------------
# IPO's length convention: ipo_loss takes the log-probs it is given; the paper's and TRL's
# convention is the token average, sequence_logps(..., average=True), which padding cannot change.


def test_ipo_on_averaged_log_probs_is_unchanged_by_padding() -> None:
    gen = torch.Generator().manual_seed(3)
    vocab, lengths = 11, [5, 3, 4, 6]  # pairs (0, 2) and (1, 3)
    rows = []
    for n in lengths:
        logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, vocab, (n,), generator=gen)
        rows.append((logits, labels))

    def ipo(pad_to: int) -> torch.Tensor:
        logits = torch.randn(len(rows), pad_to, vocab, generator=gen, dtype=torch.float64)
        labels = torch.full((len(rows), pad_to), -100)
        for i, (z, y) in enumerate(rows):
            logits[i, : len(y)], labels[i, : len(y)] = z, y
        policy = sequence_logps(logits, labels, average=True)
        ref = sequence_logps(logits * 0.9, labels, average=True)
        return ipo_loss(policy[:2], policy[2:], ref[:2], ref[2:], beta=0.2).losses

    tight, padded = ipo(max(lengths)), ipo(max(lengths) + 17)
    torch.testing.assert_close(tight, padded, rtol=1e-13, atol=1e-13)
    # and it is the formula on the token means
    means = [torch.log_softmax(z, -1).gather(-1, y[:, None]).mean() for z, y in rows]
    ref_means = [torch.log_softmax(0.9 * z, -1).gather(-1, y[:, None]).mean() for z, y in rows]
    delta = [(means[i] - ref_means[i]) - (means[i + 2] - ref_means[i + 2]) for i in range(2)]
    expected = torch.stack([(d - 1 / (2 * 0.2)) ** 2 for d in delta])
    torch.testing.assert_close(tight, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Data-parallel reward mean and vocabulary-parallel WPO adjustment in a 2-process gloo group.


@pytest.mark.distributed
def test_group_reductions_equal_the_single_process_values(tmp_path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_preference_group_worker.run, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert all(torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
