"""TP=2, PP=2 and DP=2 (2 processes, gloo) against one-process references.

One torchrun launch (``dist_scripts/parallel_checks.py``) runs every check, to pay megatron's
start-up once; each test below asserts one of its results.
"""

import json
from pathlib import Path

import pytest
from _core_torchrun import run_torchrun

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).parent / "dist_scripts" / "parallel_checks.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("parallel_checks")
    proc = run_torchrun(SCRIPT, workdir, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.parametrize(
    "check",
    [
        "tp2_logps_fused",
        "tp2_logps_logits",
        "tp2_grads_fused",
        "tp2_grads_logits",
        "pp2_logps",
        "pp2_forward_only_logps",
        "pp2_grads",
        "dp2_grads",
        "dp2_distributed_optimizer_step",
        "dp2_distributed_optimizer_resume",
        "tp2_checkpoint_at_tp1_logits",
    ],
)
def test_two_process_layout_matches_one_process(results, check):
    assert check in results, f"the script did not run {check}"
    assert results[check]["ok"], results[check]["detail"]
