"""DP=2, TP=2 and PP=2 distillation equal one process (one 2-process torchrun launch, gloo).

The script (``_kd_parallel_worker.py``) runs every check; each test below reports a group of them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "_kd_parallel_worker.py"
CONFIGS = ("fwd_tail_sft", "bwd_scaled", "cross")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kd_checks(layout: str) -> list[str]:
    out = []
    for name in CONFIGS:
        for mode in ("offline", "online") if name != "cross" else ("offline",):
            out += [f"{layout}_{name}_{mode}_metrics", f"{layout}_{name}_{mode}_grads"]
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str | None]]:
    out = tmp_path_factory.mktemp("kd_parallel")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(SCRIPT),
        str(out),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=580)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _assert_passed(outcomes, checks, ranks=(0, 1)):
    for rank in ranks:
        outcome = outcomes[rank]
        assert "crashed" not in outcome, f"rank {rank}:\n{outcome['crashed']}"
        for check in checks:
            assert check in outcome, f"rank {rank} did not run {check}"
            assert outcome[check] is None, f"rank {rank}: {check}: {outcome[check]}"


@pytest.mark.distributed
def test_dp2_teacher_pass_and_online_equals_offline(outcomes):
    checks = ["dp2_two_parts"] + [f"ref_{n}_online_equals_offline" for n in CONFIGS[:2]]
    _assert_passed(outcomes, checks)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_teacher_store_equals_single_process(outcomes, layout):
    _assert_passed(outcomes, [f"{layout}_store"])


@pytest.mark.distributed
def test_tp2_kd_metrics_and_gradients_equal_tp1(outcomes):
    _assert_passed(outcomes, _kd_checks("tp2"))


@pytest.mark.distributed
def test_pp2_kd_metrics_and_gradients_equal_pp1(outcomes):
    checks = _kd_checks("pp2")
    _assert_passed(outcomes, [c for c in checks if c.endswith("_grads")])
    _assert_passed(outcomes, checks, ranks=(1,))  # metrics live on the last stage
