"""The data-parallel sampler: partition, determinism, epochs, and exact resume."""

from __future__ import annotations

import itertools

import pytest

from align_data import DataParallelSampler


def run(sampler: DataParallelSampler, micro_batches: int) -> list[list[int]]:
    """Takes micro-batches across epoch boundaries, as a training loop does."""
    out: list[list[int]] = []
    while len(out) < micro_batches:
        out += list(itertools.islice(iter(sampler), micro_batches - len(out)))
    return out


def test_small_case_by_hand_without_shuffle():
    # 10 samples, micro 1 x accumulation 2 x DP 2 = global batch 4: 2 steps, samples 8, 9 dropped.
    kw = dict(micro_batch_size=1, accumulation_steps=2, data_parallel_size=2, shuffle=False)
    rank0 = DataParallelSampler(10, data_parallel_rank=0, **kw)
    rank1 = DataParallelSampler(10, data_parallel_rank=1, **kw)
    assert (rank0.global_batch_size, rank0.steps_per_epoch, len(rank0)) == (4, 2, 4)
    # Rank r owns [2r, 2r + 2) of each global batch.
    assert list(rank0) == [[0], [1], [4], [5]]
    assert list(rank1) == [[2], [3], [6], [7]]
    assert rank0.consumed_samples == 8 and rank0.epoch == 1
    assert list(rank0) == [[0], [1], [4], [5]]  # next epoch, same order without shuffling


def test_ranks_partition_each_global_batch():
    n, m, acc, dp = 103, 2, 3, 4
    samplers = [
        DataParallelSampler(
            n,
            micro_batch_size=m,
            accumulation_steps=acc,
            data_parallel_size=dp,
            data_parallel_rank=r,
            seed=11,
        )
        for r in range(dp)
    ]
    per_rank = [run(s, 2 * 4 * acc) for s in samplers]  # 2 epochs of 4 steps
    gbs = m * acc * dp
    for step in range(8):
        batch = [
            i for r in range(dp) for mb in per_rank[r][step * acc : (step + 1) * acc] for i in mb
        ]
        assert len(batch) == gbs == len(set(batch))
    epoch0 = {i for r in range(dp) for mb in per_rank[r][: 4 * acc] for i in mb}
    epoch1 = {i for r in range(dp) for mb in per_rank[r][4 * acc :] for i in mb}
    assert len(epoch0) == len(epoch1) == 4 * gbs
    # Reshuffled every epoch.
    order0 = [i for mb in per_rank[0][: 4 * acc] for i in mb]
    order1 = [i for mb in per_rank[0][4 * acc :] for i in mb]
    assert order0 != order1


def test_seed_determines_the_order():
    a = DataParallelSampler(50, micro_batch_size=5, seed=1)
    b = DataParallelSampler(50, micro_batch_size=5, seed=1)
    c = DataParallelSampler(50, micro_batch_size=5, seed=2)
    assert list(a) == list(b) != list(c)


@pytest.mark.parametrize("dp", [1, 3])
@pytest.mark.parametrize("k", [0, 4, 9, 15, 23])
def test_resume_matches_an_uninterrupted_run(dp, k):
    kw = dict(micro_batch_size=2, accumulation_steps=2, data_parallel_size=dp, seed=7)
    n = 30 if dp == 1 else 40
    for rank in range(dp):
        full = run(DataParallelSampler(n, data_parallel_rank=rank, **kw), 40)
        first = DataParallelSampler(n, data_parallel_rank=rank, **kw)
        taken = run(first, k)
        state = first.state_dict()
        assert state["consumed_samples"] == k * 2 * dp
        resumed = DataParallelSampler(n, data_parallel_rank=rank, **kw)
        resumed.load_state_dict(state)
        assert taken + run(resumed, 40 - k) == full
        # Same through the constructor argument.
        direct = DataParallelSampler(n, data_parallel_rank=rank, consumed_samples=k * 2 * dp, **kw)
        assert run(direct, 40 - k) == full[k:]


def test_micro_batch_split_does_not_change_what_a_step_sees():
    one = DataParallelSampler(64, micro_batch_size=1, accumulation_steps=8, seed=3)
    eight = DataParallelSampler(64, micro_batch_size=8, accumulation_steps=1, seed=3)
    steps_one = [[i for mb in run(one, 8) for i in mb] for _ in range(3)]
    steps_eight = [run(eight, 1)[0] for _ in range(3)]
    assert steps_one == steps_eight


def test_resume_with_a_different_data_parallel_layout():
    # Same global batch (8): DP 2 x micro 2 x acc 2 saved, DP 4 x micro 2 x acc 1 resumed.
    old = [
        DataParallelSampler(
            40,
            micro_batch_size=2,
            accumulation_steps=2,
            data_parallel_size=2,
            data_parallel_rank=r,
            seed=5,
        )
        for r in range(2)
    ]
    for s in old:
        run(s, 6)  # 3 optimizer steps
    state = old[0].state_dict()
    new = [
        DataParallelSampler(
            40, micro_batch_size=2, data_parallel_size=4, data_parallel_rank=r, seed=5
        )
        for r in range(4)
    ]
    for s in new:
        s.load_state_dict(state)
    expected = [DataParallelSampler(40, micro_batch_size=8, seed=5, consumed_samples=24)]
    next_step = sorted(i for s in new for i in run(s, 1)[0])
    assert next_step == sorted(run(expected[0], 1)[0])


def test_errors():
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        DataParallelSampler(7, micro_batch_size=4, data_parallel_size=2)
    with pytest.raises(
        ValueError, match="not a multiple of micro_batch_size x data_parallel_size = 4"
    ):
        DataParallelSampler(20, micro_batch_size=2, data_parallel_size=2, consumed_samples=6)
    s = DataParallelSampler(20, micro_batch_size=2, seed=1)
    with pytest.raises(ValueError, match="saved seed=2"):
        s.load_state_dict({**s.state_dict(), "seed": 2})
    with pytest.raises(ValueError, match="saved global_batch_size=4"):
        s.load_state_dict({**s.state_dict(), "global_batch_size": 4})
    with pytest.raises(ValueError, match="data_parallel_rank 2"):
        DataParallelSampler(20, micro_batch_size=2, data_parallel_size=2, data_parallel_rank=2)


def test_works_as_a_dataloader_batch_sampler():
    from torch.utils.data import DataLoader

    sampler = DataParallelSampler(12, micro_batch_size=3, shuffle=False)
    loader = DataLoader(list(range(100, 112)), batch_sampler=sampler)
    assert [b.tolist() for b in loader] == [
        [100, 101, 102],
        [103, 104, 105],
        [106, 107, 108],
        [109, 110, 111],
    ]
