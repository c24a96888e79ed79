"""SPIN runs end to end on CPU (one process, tiny GPT, synthetic SFT task).

Two iterations of two epochs (4 steps each, 8 in all) with validation at each iteration's end.
What is checked: per-step metrics and their iteration fields; the generations and validation
files; a run stopped by SIGTERM in the middle of iteration 1 resumes with exactly the
uninterrupted run's next steps, without generating iteration 1 again; the mid-iteration
checkpoint holds the iteration and the opponent, which equals the policy saved when the
iteration began; the final checkpoint continues with a third iteration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from align_core import Checkpointer, ModelConfig, build_gpt_model
from align_core.algorithms.spin import SPINConfig
from align_core.generation import LengthConfig
from align_core.optim import OptimizerConfig, SchedulerConfig
from align_core.trainer import DataConfig, InMemorySink, SyntheticConfig
from align_core.trainer.spin import SPINRunConfig, SPINTrainerConfig, train_spin
from align_data import ByteTokenizer

pytestmark = [
    pytest.mark.slow,  # each run takes 10-40 s on two shared cores
    pytest.mark.usefixtures("one_thread"),
]

MODEL = ModelConfig(vocab_size=ByteTokenizer().vocab_size, seq_length=64)
STEPS = 8  # 16 prompts / 8 per step = 2 steps per epoch, 2 epochs, 2 iterations
COMPARED = ("loss", "acc", "rewards_actual_mean", "rewards_generated_mean", "grad_norm", "lr")


def spin_run(run_dir: Path, **trainer) -> SPINRunConfig:
    return SPINRunConfig(
        run_dir=str(run_dir),
        model=MODEL,
        trainer=SPINTrainerConfig(
            **{
                "max_iterations": 2,
                "max_epochs": 2,
                "val_check_interval": 4,
                "save_interval": 0,
                "keep_last_checkpoints": 3,
                **trainer,
            }
        ),
        data=DataConfig(
            micro_batch_size=4,
            global_batch_size=8,
            synthetic=SyntheticConfig(num_train=16, num_validation=8),
        ),
        spin=SPINConfig(
            ref_policy_kl_penalty=[0.2, 0.5, 0.5],
            rollout_micro_batch_size=5,
            length_params=LengthConfig(max_length=24),
            val_generations=2,
        ),
        optim=OptimizerConfig(lr=1e-3, weight_decay=0.0),
        sched=SchedulerConfig(style="cosine", min_lr=1e-4),
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class SigtermAfter:
    """A sink that sends this process SIGTERM once a given training step is logged."""

    def __init__(self, step: int) -> None:
        self.step = step

    def start(self, plan) -> None:
        pass

    def log(self, split, step, metrics) -> None:
        if split == "train" and step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def finish(self, result) -> None:
        pass


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("spin_full")
    sink = InMemorySink()
    result = train_spin(spin_run(run_dir), [sink])
    return run_dir, sink, result


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by SIGTERM after step 6 (iteration 1, local step 2), then resumed."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("spin_resumed")
    first = InMemorySink()
    stopped = train_spin(spin_run(run_dir), [first, SigtermAfter(6)])
    generations = run_dir / "generations" / "iter_1.jsonl"
    before = os.stat(generations)
    second = InMemorySink()
    resumed = train_spin(spin_run(run_dir), [second])
    return run_dir, first, stopped, before, second, resumed


def test_two_iterations_log_spin_metrics_per_step(full, dist_ctx):
    run_dir, sink, result = full
    assert result.stop_reason == "completed" and result.steps == STEPS
    assert result.consumed_samples == 8 * STEPS and result.reference_strategy == "swap"
    assert [s for s, _ in sink.train] == list(range(1, STEPS + 1))
    train = dict(sink.train)
    # Each iteration starts with opponent = policy: every pair's loss is -log σ(0).
    assert train[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[5]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[5]["rewards_margin"] == 0.0
    assert train[4]["loss"] < math.log(2) and train[8]["loss"] < math.log(2)
    assert [train[s]["iteration"] for s in train] == [0.0] * 4 + [1.0] * 4
    assert [train[s]["kl_penalty"] for s in train] == [0.2] * 4 + [0.5] * 4
    assert [train[s]["epoch"] for s in train] == [1.0, 1.0, 2.0, 2.0] * 2
    assert [train[s]["consumed_samples"] for s in train] == [8.0 * s for s in train]
    for metrics in train.values():
        for key in ("acc", "rewards_actual_mean", "rewards_generated_mean", "rewards_margin"):
            assert math.isfinite(metrics[key]), key
        assert 1 <= metrics["generated_length_mean"] <= 24
        assert metrics["generation_tokens_per_s"] > 0
    assert sink.plan.algorithm == "spin" and sink.plan.max_steps == STEPS
    assert sink.result == result
    val = dict(sink.val)
    assert sorted(val) == [4, 8]
    assert val[8]["iteration"] == 1.0 and 1 <= val[8]["generated_length_mean"] <= 24
    assert val[8]["loss"] == val[8]["sft_loss"] and val[8]["loss"] > 0
    assert result.last_val_metrics == val[8] and result.last_train_metrics == train[8]
    assert result.nemo_path == str(run_dir / "final.nemo") and Path(result.nemo_path).is_file()


def test_generations_and_validation_files(full, dist_ctx):
    run_dir, _, _ = full
    tok = ByteTokenizer()
    (train_file,) = (run_dir / "data").glob("synthetic-*/sft_train.jsonl")
    prompts = _jsonl(train_file)
    for t in (0, 1):
        rows = [
            json.loads(x)
            for x in (run_dir / f"generations/iter_{t}.jsonl").read_text().splitlines()
        ]
        assert [r["index"] for r in rows] == list(range(16))
        for row, record in zip(rows, prompts, strict=True):
            assert row["prompt"] == record["prompt"] and row["real"] == record["completion"]
            assert row["prompt_ids"] == [tok.bos_id, *tok.encode(record["prompt"])]
            assert row["real_ids"] == [*tok.encode(record["completion"]), tok.eos_id]
            assert row["generated_length"] == len(row["generated_ids"]) <= 24
            assert row["finished"] == (row["generated_ids"][-1] == tok.eos_id)
        meta = json.loads((run_dir / f"generations/iter_{t}.meta.json").read_text())
        assert meta["key"]["iteration"] == t and meta["generated_tokens"] == sum(
            r["generated_length"] for r in rows
        )
    iter0 = (run_dir / "generations/iter_0.jsonl").read_text()
    assert iter0 != (run_dir / "generations/iter_1.jsonl").read_text()  # a new opponent
    for step in (4, 8):
        val = [
            json.loads(x)
            for x in (run_dir / f"generations/val_step_{step:06d}.jsonl").read_text().splitlines()
        ]
        assert [v["index"] for v in val] == [0, 1] and all(v["step"] == step for v in val)


def test_resume_mid_iteration_continues_the_uninterrupted_run(full, interrupted, dist_ctx):
    _, reference, _ = full
    run_dir, first, stopped, before, second, resumed = interrupted
    assert stopped.stop_reason == "sigterm" and stopped.steps == 6
    assert [s for s, _ in first.train] == [1, 2, 3, 4, 5, 6]
    assert resumed.stop_reason == "completed" and resumed.steps == STEPS
    assert [s for s, _ in second.train] == [7, 8]
    assert second.plan.start_step == 6 and second.plan.resumed_from.endswith("step_000006")
    want = dict(reference.train)
    for step, metrics in [*first.train, *second.train]:
        for key in (*COMPARED, "consumed_samples", "iteration", "epoch"):
            assert metrics[key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-7), (step, key)
    assert dict(second.val)[8]["loss"] == pytest.approx(dict(reference.val)[8]["loss"], rel=1e-6)
    # Iteration 1's generations were read back, not drawn again.
    after = os.stat(run_dir / "generations" / "iter_1.jsonl")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_mid_iteration_checkpoint_holds_iteration_and_opponent(interrupted, dist_ctx):
    from megatron.core import dist_checkpointing

    run_dir, *_ = interrupted
    checkpoints = Checkpointer(run_dir / "checkpoints", keep_last=3)
    assert checkpoints.steps() == [4, 6, 8]
    common = dist_checkpointing.load_common_state_dict(str(checkpoints.path(6)))["common"]
    assert common["extra_models"] == ["opponent"]
    assert common["extra_state"]["spin"] == {"iteration": 1, "iteration_start_step": 4}
    assert common["trainer_state"]["step"] == 6 and common["trainer_state"]["iteration"] == 1
    # The opponent of iteration 1 is the policy as iteration 0 ended (step 4).
    policy_at_4, policy_at_6, opponent = (build_gpt_model(MODEL) for _ in range(3))
    checkpoints.load(policy_at_4, step=4, load_rng=False)
    checkpoints.load(policy_at_6, step=6, extra_models={"opponent": opponent}, load_rng=False)
    moved = False
    for (name, a), (_, b), (_, c) in zip(
        policy_at_4.named_parameters(),
        opponent.named_parameters(),
        policy_at_6.named_parameters(),
        strict=True,
    ):
        assert torch.equal(a, b), name
        moved = moved or not torch.equal(b, c)
    assert moved  # the policy trained on while the opponent stayed


def test_final_checkpoint_continues_with_another_iteration(interrupted, dist_ctx):
    run_dir, *_ = interrupted
    sink = InMemorySink()
    result = train_spin(spin_run(run_dir, max_iterations=3, val_check_interval=0), [sink])
    assert result.stop_reason == "completed" and result.steps == 12
    assert [s for s, _ in sink.train] == [9, 10, 11, 12]
    train = dict(sink.train)
    assert train[9]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # opponent = policy
    assert all(m["iteration"] == 2.0 and m["kl_penalty"] == 0.5 for m in train.values())
    assert (run_dir / "generations" / "iter_2.meta.json").is_file()


def test_train_on_previous_iteration_adds_the_last_iterations_pairs(tmp_path, dist_ctx):
    sink = InMemorySink()
    config = spin_run(tmp_path, max_epochs=1, val_check_interval=0)
    config.spin = dataclasses.replace(config.spin, train_on_previous_iteration=True)
    result = train_spin(config, [sink])
    # Iteration 0: 16 pairs, 2 steps; iteration 1: its 16 pairs and iteration 0's, 4 steps.
    assert result.steps == 6 and [m["iteration"] for _, m in sink.train] == [0, 0, 1, 1, 1, 1]
    lengths = {
        t: [r["generated_length"] for r in _jsonl(tmp_path / f"generations/iter_{t}.jsonl")]
        for t in (0, 1)
    }
    means = [m["generated_length_mean"] for _, m in sink.train]
    assert sum(means[:2]) / 2 == pytest.approx(sum(lengths[0]) / 16)
    assert sum(means[2:]) / 4 == pytest.approx((sum(lengths[0]) + sum(lengths[1])) / 32)
