"""Step accounting, time limits, strategy resolution and the data order (no model)."""

import numpy as np
import pytest

from align_core.algorithms import DPOConfig
from align_core.algorithms.dpo import DPOStep
from align_core.reference import resolve_strategy
from align_core.trainer import TrainerConfig
from align_core.trainer.data import TrainData
from align_core.trainer.loop import plan_steps, resume_length_note
from align_core.trainer.signals import StopRequest, parse_max_time
from align_data import CollateConfig, PreferenceExample


def test_resume_length_note_names_the_capping_key():
    kw = {"train_samples": 1000, "global_batch_size": 64, "val_batches": 0}
    # Raising max_steps to 100 on resume is capped by max_epochs=1 (15 steps per epoch).
    config = TrainerConfig(max_epochs=1, max_steps=100)
    plan = plan_steps(config, **kw)
    note = resume_length_note(10, config, plan, start_step=10)
    assert note is not None and "\n" not in note
    assert "original run planned 10 steps, this one 15" in note
    assert "trainer.max_epochs=1" in note and "re-planned over 15" in note
    assert "from step 10" in note
    config = TrainerConfig(max_epochs=3, max_steps=20)
    note = resume_length_note(
        30, config, plan_steps(config, **kw), start_step=5, prefix="trainer.kto"
    )
    assert note is not None and "this one 20 (set by trainer.kto.max_steps=20)" in note
    # Same length, or an older checkpoint that did not record it: nothing to say.
    assert (
        resume_length_note(15, TrainerConfig(), plan_steps(TrainerConfig(), **kw), start_step=3)
        is None
    )
    assert (
        resume_length_note(None, TrainerConfig(), plan_steps(TrainerConfig(), **kw), start_step=3)
        is None
    )


def test_nemo_step_accounting():
    # 1000 samples, GBS 64: 15 full batches per epoch (remainder dropped).
    plan = plan_steps(
        TrainerConfig(max_epochs=2, val_check_interval=0.1, save_interval=5),
        train_samples=1000,
        global_batch_size=64,
        val_batches=3,
    )
    assert (plan.steps_per_epoch, plan.max_steps) == (15, 30)
    assert plan.val_check_interval == 1  # int(0.1 × 15)
    assert plan.val_batches == 3 and plan.save_interval == 5
    capped = plan_steps(
        TrainerConfig(max_epochs=3, max_steps=20, val_check_interval=4, limit_val_batches=2),
        train_samples=1000,
        global_batch_size=64,
        val_batches=3,
    )
    assert (capped.max_steps, capped.val_check_interval, capped.val_batches) == (20, 4, 2)
    half = plan_steps(
        TrainerConfig(limit_train_batches=0.5, limit_val_batches=0.0),
        train_samples=1000,
        global_batch_size=64,
        val_batches=3,
    )
    assert (half.steps_per_epoch, half.val_batches, half.val_check_interval) == (7, 0, 0)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        plan_steps(TrainerConfig(), train_samples=10, global_batch_size=64, val_batches=0)


def test_max_time_parsing_and_deadline():
    assert parse_max_time(None) is None
    assert parse_max_time("00:01:01:05") == 3665.0
    assert parse_max_time("1:00:00:00") == 86400.0
    assert parse_max_time("90") == 90.0
    with pytest.raises(ValueError, match="DD:HH:MM:SS"):
        parse_max_time("1h")
    assert StopRequest(0.0).time_up
    assert not StopRequest(None).time_up


def test_reference_strategy_resolution_never_falls_back():
    assert resolve_strategy("auto", lora=True) == "adapters"
    assert resolve_strategy("auto", lora=False) == "precompute"
    assert resolve_strategy("swap", lora=True) == "swap"
    with pytest.raises(ValueError, match="needs LoRA"):
        resolve_strategy("adapters", lora=False)
    with pytest.raises(ValueError, match="not possible"):
        resolve_strategy("precompute", lora=False, precompute_possible=False)
    with pytest.raises(ValueError, match="set swap or model explicitly"):
        resolve_strategy("auto", lora=False, precompute_possible=False)


def _examples(n):
    rng = np.random.default_rng(0)
    return [
        PreferenceExample(
            rng.integers(0, 50, 3), rng.integers(0, 50, 2), rng.integers(0, 50, 4), index=i
        )
        for i in range(n)
    ]


def _data(rank=0, size=1, mbs=2, gbs=8, **kwargs):
    return TrainData(
        _examples(40),
        _examples(16),
        DPOStep(DPOConfig()),
        CollateConfig(pad_id=0),
        micro_batch_size=mbs,
        global_batch_size=gbs,
        data_parallel_rank=rank,
        data_parallel_size=size,
        seed=3,
        **kwargs,
    )


def test_data_order_is_a_function_of_consumed_samples():
    data = _data()
    assert data.batches_per_epoch == 5
    seen = np.concatenate([data.train_indices(k * 8) for k in range(5)])
    assert sorted(seen.tolist()) == list(range(40))  # one epoch visits every example once
    assert not np.array_equal(data.train_indices(40), data.train_indices(0))  # reshuffled
    # Resuming from a count gives the same batch as the uninterrupted sequence.
    again = _data()
    for consumed in (0, 16, 48):
        a = [mb["sample_index"].tolist() for mb in data.train_micro_batches(consumed)]
        b = [mb["sample_index"].tolist() for mb in again.train_micro_batches(consumed)]
        assert a == b


def test_data_parallel_ranks_split_the_global_batch():
    ranks = [_data(rank=r, size=2) for r in range(2)]
    full = _data().train_indices(8).tolist()
    got = [i for d in ranks for mb in d.train_micro_batches(8) for i in mb["sample_index"].tolist()]
    assert got == full
    # Micro 1 x accumulation 8 sees the same examples in the same order as 8 x 1.
    one = [i for mb in _data(mbs=1).train_micro_batches(8) for i in mb["sample_index"].tolist()]
    eight = [i for mb in _data(mbs=8).train_micro_batches(8) for i in mb["sample_index"].tolist()]
    assert one == eight == full
    # All micro-batches of a step share one padded length.
    assert len({mb["tokens"].shape for mb in _data(mbs=1).train_micro_batches(8)}) == 1


def test_a_limited_epoch_ends_where_the_trainer_epoch_ends():
    # 40 examples, global batch 8: 5 complete batches; limit_train_batches 0.4 keeps
    # int(5 × 0.4) = 2 steps per epoch, so 3 epochs are 6 steps.
    plan = plan_steps(
        TrainerConfig(max_epochs=3, limit_train_batches=0.4),
        train_samples=40,
        global_batch_size=8,
        val_batches=0,
    )
    assert (plan.steps_per_epoch, plan.max_steps) == (2, 6)
    data = _data(epoch_batches=plan.steps_per_epoch, per_epoch_cache_rows=True)
    assert data.steps_per_epoch == 2 and data.batches_per_epoch == 5
    # Step s (1-based) follows consumed = 8·(s − 1) examples; its epoch is (s − 1) // 2 and it
    # takes batch (s − 1) % 2 of that epoch's permutation (seed 3, numpy's default_rng([3, e])).
    for step, epoch, batch in [(1, 0, 0), (2, 0, 1), (3, 1, 0), (4, 1, 1), (5, 2, 0), (6, 2, 1)]:
        consumed = 8 * (step - 1)
        order = np.random.default_rng([3, epoch]).permutation(40)
        assert data.epoch_of(consumed) == epoch
        want = order[8 * batch : 8 * batch + 8]
        assert data.train_indices(consumed).tolist() == want.tolist()
        rows = np.concatenate([mb["cache_rows"] for mb in data.train_micro_batches(consumed)])
        assert rows.tolist() == (want + 40 * epoch).tolist()  # KTO's per-epoch cache rows
    # Without the limit the third step is still in epoch 0, at its third batch.
    full = _data()
    assert full.epoch_of(16) == 0
    assert (
        full.train_indices(16).tolist()
        == np.random.default_rng([3, 0]).permutation(40)[16:24].tolist()
    )


def test_epoch_lengths_of_data_and_trainer_must_agree(dist_ctx):
    import torch

    from align_core.algorithms import SFTConfig
    from align_core.algorithms.sft import SFTStep
    from align_core.trainer.loop import ParallelGroups, Trainer

    config = TrainerConfig(limit_train_batches=0.4)
    groups = ParallelGroups.from_megatron(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"data's epochs hold 5 .* hold 2 .*epoch_batches=2"):
        Trainer(config=config, algorithm=SFTStep(SFTConfig()), model=None, optimizer=None,
                data=_data(), forward_fn=None, learning_rate=None, groups=groups)  # fmt: skip
    with pytest.raises(ValueError, match=r"epoch_batches 6 must be in \[1, 5\]"):
        _data(epoch_batches=6)
    with pytest.raises(ValueError, match=r"limit_train_batches 0\.1 leaves no step of the 5"):
        plan_steps(TrainerConfig(limit_train_batches=0.1), train_samples=40, global_batch_size=8,
                   val_batches=0)  # fmt: skip
