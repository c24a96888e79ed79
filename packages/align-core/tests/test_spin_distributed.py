"""SPIN on two data-parallel ranks equals SPIN in one process (one torchrun launch, gloo).

The two-rank run generates one prompt per call (a rollout size smaller than the data-parallel
size, which NeMo-Aligner could not do); the one-process run generates three per call. Both must
write the same generations and take the same training steps.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _core_torchrun import run_torchrun

SCRIPTS = Path(__file__).parent / "spin_scripts"
_spec = importlib.util.spec_from_file_location("_spin_config", SCRIPTS / "config.py")
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)


def _rows(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "generations" / name).read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.distributed
def test_two_data_parallel_ranks_with_rollout_size_one_equal_one_process(dist_ctx, tmp_path):
    from align_core.trainer import InMemorySink
    from align_core.trainer.spin import train_spin

    dp2, out = tmp_path / "dp2", tmp_path / "dp2.json"
    proc = run_torchrun(SCRIPTS / "dp2_spin.py", dp2, out, timeout=540)
    outcome = json.loads(out.read_text()) if out.is_file() else {}
    assert "crashed" not in outcome, outcome.get("crashed")
    assert proc.returncode == 0, proc.stderr[-4000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dp1, sink = tmp_path / "dp1", InMemorySink()
        train_spin(C.spin_config(str(dp1), micro_batch_size=4, rollout_micro_batch_size=3), [sink])
    finally:
        torch.set_num_threads(threads)

    assert _rows(dp2, "iter_0.jsonl") == _rows(dp1, "iter_0.jsonl")
    assert _rows(dp2, "val_step_000002.jsonl") == _rows(dp1, "val_step_000002.jsonl")
    assert outcome["steps"] == 2
    for (step, two), (same, one) in zip(outcome["train"], sink.train, strict=True):
        assert step == same
        for key in ("loss", "acc", "rewards_margin", "generated_length_mean", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (step, key)
    (_, val2), (_, val1) = outcome["val"][-1], sink.val[-1]
    assert val2["loss"] == pytest.approx(val1["loss"], rel=1e-6)
