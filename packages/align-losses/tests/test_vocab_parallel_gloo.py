"""Vocabulary-parallel calls in a real 2-process gloo group equal the unsharded calls.

One ``torch.multiprocessing.spawn`` runs every check (see ``_losses_vp_worker.py``); each test
below reports one check on both ranks.
"""

import json
import socket

import _losses_vp_worker as worker
import pytest
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str | None]]:
    out = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(worker.run, args=(WORLD_SIZE, _free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@pytest.mark.distributed
@pytest.mark.parametrize("check", list(worker.CHECKS))
def test_sharded_equals_unsharded(results: list[dict[str, str | None]], check: str) -> None:
    for rank, outcome in enumerate(results):
        assert check in outcome, f"rank {rank} did not run {check}"
        assert outcome[check] is None, f"rank {rank}:\n{outcome[check]}"
