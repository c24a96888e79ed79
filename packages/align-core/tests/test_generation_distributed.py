"""TP=2 and PP=2 generation equal TP=1 on the same weights (one 2-process torchrun launch, gloo).

The script (``gen_scripts/tp_pp_generate.py``) runs every check; each test below reports one.
"""

import json
from pathlib import Path

import pytest
from _core_torchrun import run_torchrun

SCRIPT = Path(__file__).parent / "gen_scripts" / "tp_pp_generate.py"
CHECKS = [
    f"{layout}_{key}"
    for layout in ("tp2", "pp2")
    for key in ("greedy", "greedy_lengths", "greedy_logprobs", "greedy_no_cache", "sampled")
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str | None]]:
    out = tmp_path_factory.mktemp("tp_pp_generate")
    proc = run_torchrun(SCRIPT, out, timeout=540)
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
