"""End-to-end runs of ``align run spin`` and ``align generate`` on CPU (one process each).

SPIN: the tiny default model on align-data's synthetic SFT task, two iterations of two steps.
A run stopped after step 3 (``trainer.spin.max_steps=3``, in the middle of the second
iteration) and continued with ``--resume`` gives the uninterrupted run's step-4 metrics and
reuses the saved generations of the second iteration instead of drawing them again.

Generate: greedy completions of a prompts file are the same whatever the micro-batch size,
one line per prompt in input order, with the requested length limits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SPIN = [
    "-q",
    "model.data.synthetic.num_train=16",
    "model.data.synthetic.num_validation=8",
    "model.global_batch_size=8",
    "model.micro_batch_size=4",
    "model.spin.length_params.max_length=8",
    "model.spin.val_generations=2",
    # A constant learning rate: the schedule does not depend on the run's total steps.
    "model.optim.sched.name=Constant",
    "model.optim.sched.warmup_steps=0",
    "trainer.spin.max_iterations=2",
    "trainer.spin.val_check_interval=0",
    "trainer.spin.save_interval=1",
    "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
]


def test_spin_resume_mid_iteration_matches_uninterrupted(tmp_path: Path, align, metrics) -> None:
    full = tmp_path / "full"
    align("run", "spin", *SPIN, f"exp_manager.explicit_log_dir={full}", cwd=tmp_path)
    reference = metrics(full)
    assert sorted(reference) == [1, 2, 3, 4]
    assert [reference[s]["iteration"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    for step in (1, 3):
        # The first step of an iteration: the policy is its opponent, every pair's loss ln 2.
        assert reference[step]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    generated = [
        json.loads(x) for x in (full / "generations" / "iter_1.jsonl").read_text().splitlines()
    ]
    assert len(generated) == 16

    part = tmp_path / "part"
    args = (*SPIN, f"exp_manager.explicit_log_dir={part}")
    align("run", "spin", *args, "trainer.spin.max_steps=3", cwd=tmp_path)
    assert sorted(metrics(part)) == [1, 2, 3]
    saved = part / "generations" / "iter_1.jsonl"
    before = (saved.stat().st_mtime_ns, saved.read_bytes())

    # The saved config.yaml is the base of a resumed run: lift its step cap.
    align("run", "spin", "--resume", *args, "trainer.spin.max_steps=-1", cwd=tmp_path)
    resumed = metrics(part)
    assert sorted(resumed) == [1, 2, 3, 4]
    # The second iteration's answers were read back, not generated again.
    assert (saved.stat().st_mtime_ns, saved.read_bytes()) == before
    assert saved.read_bytes() == (full / "generations" / "iter_1.jsonl").read_bytes()
    for key in ("loss", "acc", "rewards_actual_mean", "rewards_generated_mean", "grad_norm"):
        assert resumed[4][key] == pytest.approx(reference[4][key], rel=1e-5, abs=1e-7), key
    assert resumed[4]["iteration"] == 1
    summary = json.loads((part / "summary.json").read_text())
    assert summary["result"]["stop_reason"] == "completed"
    assert summary["result"]["steps"] == 4


def test_generate_greedy_is_deterministic_and_respects_lengths(
    tmp_path: Path, align, tiny_nemos
) -> None:
    prompts = ["Answer in capitals: hello", "Say two words.", "x"]
    records = [{"prompt": p} for p in prompts[:2]]
    records.append({"input": prompts[2]})  # NeMo's prompt key
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = (
        "--restore", str(tiny_nemos["student"]), str(source),
        "sampling_params.use_greedy=true",
        "length_params.max_length=6",
        "length_params.min_length=6",
    )  # fmt: skip
    one = align("generate", *common, "--out", "a.jsonl", "micro_batch_size=1", cwd=tmp_path)
    assert "wrote 3 completions" in one.stdout
    align("generate", "-q", *common, "--out", "b.jsonl", "micro_batch_size=3", cwd=tmp_path)
    first = (tmp_path / "a.jsonl").read_text()
    assert first == (tmp_path / "b.jsonl").read_text()
    rows = [json.loads(line) for line in first.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["prompt"] for r in rows] == prompts
    # min_length = max_length: every answer has exactly six tokens and was cut by the limit.
    assert all(r["generated_length"] == 6 and not r["finished"] for r in rows)
    # A longer prompt is longer in tokens.
    assert rows[0]["prompt_length"] > rows[1]["prompt_length"]
