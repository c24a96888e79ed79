"""TP=2, PP=2 and DP=2 (2 processes, gloo) against one-process references.

One torchrun launch (``dist_scripts/parallel_checks.py``) runs every check, to pay megatron's
start-up once; each test below asserts one of its results.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_core import free_port

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).parent / "dist_scripts" / "parallel_checks.py"
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("parallel_checks")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(SCRIPT),
        str(workdir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
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
