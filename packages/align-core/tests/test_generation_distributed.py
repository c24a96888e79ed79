"""TP=2 and PP=2 generation equal TP=1 on the same weights (one 2-process torchrun launch, gloo).

The script (``gen_scripts/tp_pp_generate.py``) runs every check; each test below reports one.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "gen_scripts" / "tp_pp_generate.py"
CHECKS = [
    f"{layout}_{key}"
    for layout in ("tp2", "pp2")
    for key in ("greedy", "greedy_lengths", "greedy_logprobs", "greedy_no_cache", "sampled")
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str | None]]:
    out = tmp_path_factory.mktemp("tp_pp_generate")
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
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
def test_no_rank_crashed(outcomes):
    for rank, outcome in enumerate(outcomes):
        assert "crashed" not in outcome, f"rank {rank}:\n{outcome['crashed']}"
        assert outcome["reference_stops_in_range"] is None


@pytest.mark.distributed
@pytest.mark.parametrize("check", CHECKS)
def test_parallel_generation_equals_tp1(outcomes, check):
    for rank, outcome in enumerate(outcomes):
        assert check in outcome, f"rank {rank} did not run {check}"
        assert outcome[check] is None, f"rank {rank}: {outcome[check]}"
