"""Launch decisions (torchrun, Slurm) and run directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from align_cli.errors import UsageError
from align_cli.launch import (
    LaunchOptions,
    first_host,
    launcher,
    prepare_slurm_env,
    torchrun_command,
    world_rank,
)
from align_cli.rundir import (
    find_last_run,
    new_run_dir,
    read_run_info,
    run_started,
    write_run_info,
)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node07", "node07"),
        ("node[03-05,9]", "node03"),
        ("gpu[12,14],cpu1", "gpu12"),
        ("a-b-c[001-004]", "a-b-c001"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_launcher_detection() -> None:
    assert launcher({}) is None
    assert launcher({"RANK": "1", "WORLD_SIZE": "4"}) == "torchrun"
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}
    assert launcher(slurm) == "slurm"
    assert world_rank(slurm) == 3
    # A Slurm allocation (salloc/sbatch shell) that is not inside an srun step is no launcher.
    assert launcher({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) is None
    assert launcher({**slurm, "SLURM_NTASKS": "1"}) is None


def test_slurm_environment_fills_the_rendezvous() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "node[10-11]",
    }
    prepare_slurm_env(env)
    assert env["MASTER_ADDR"] == "node10"
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert env["LOCAL_RANK"] == "1"
    kept = {"MASTER_ADDR": "head", "MASTER_PORT": "1234"}
    prepare_slurm_env(kept)
    assert kept["MASTER_ADDR"] == "head" and kept["MASTER_PORT"] == "1234"


def test_torchrun_command_reinvokes_the_worker(tmp_path: Path) -> None:
    options = LaunchOptions(
        nproc_per_node=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=6000
    )
    command = torchrun_command(options, tmp_path)
    # torchrun's own launcher, run by align_cli.torchrun to keep the workers' exit status.
    assert command[:3] == [sys.executable, "-m", "align_cli.torchrun"]
    for flag in (
        "--nproc-per-node=4",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=6000",
    ):
        assert flag in command
    assert command[-3:] == ["--module", "align_cli.worker", str(tmp_path)]
    assert options.world_size == 8
    # -q reaches the workers: the output is the same at any number of processes.
    quiet = torchrun_command(options, tmp_path, quiet=True)
    assert quiet[-4:] == ["--module", "align_cli.worker", str(tmp_path), "--quiet"]


@pytest.mark.parametrize(
    ("codes", "status"),
    [
        ([2], 2),
        ([1, 2], 2),  # bad input on one rank is the cause; the others failed because of it
        ([1], 1),  # a non-finite loss (or a worker's traceback)
        ([143], 143),
        ([-9], 137),  # killed by SIGKILL
        ([-15, 1], 143),
    ],
)
def test_torchrun_exit_status_is_the_workers(codes: list[int], status: int) -> None:
    from align_cli.torchrun import exit_status

    assert exit_status(codes) == status


def test_run_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = new_run_dir(str(tmp_path), None, "kto")
    assert first.parent == tmp_path and first.name.startswith("kto-")
    assert new_run_dir(str(tmp_path), "mine", "kto") == tmp_path / "mine"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert new_run_dir(str(tmp_path), None, "dpo") == tmp_path / "dpo-slurm42.3"


def _run(root: Path, name: str, command: str, created: str, started: str | None) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    write_run_info(run, command, command, ["align", "run", command])
    info = json.loads((run / "run.json").read_text())
    info["created"] = created
    (run / "run.json").write_text(json.dumps(info))
    if started == "metrics":
        (run / "metrics.jsonl").write_text("")
    elif started == "checkpoint":
        (run / "checkpoints" / "step_000004").mkdir(parents=True)
    return run


def test_find_last_run_picks_the_newest_started_run_of_the_command(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no `align run dpo` run"):
        find_last_run(str(tmp_path), "dpo")
    _run(tmp_path, "a", "dpo", "2026-01-01T00:00:00", "checkpoint")
    _run(tmp_path, "b", "dpo", "2026-02-01T00:00:00", "metrics")
    _run(tmp_path, "c", "kto", "2026-03-01T00:00:00", "metrics")
    # The newest dpo directory is a stub of a start that failed: nothing to resume there.
    stub = _run(tmp_path, "d", "dpo", "2026-04-01T00:00:00", None)
    assert not run_started(stub) and run_started(tmp_path / "a")
    assert find_last_run(str(tmp_path), "dpo") == tmp_path / "b"
    assert find_last_run(str(tmp_path), "kto") == tmp_path / "c"
    _run(tmp_path, "e", "sft", "2026-05-01T00:00:00", None)
    with pytest.raises(UsageError, match=r"1 run directory there never started training"):
        find_last_run(str(tmp_path), "sft")
    info = read_run_info(tmp_path / "b")
    assert info.command == "dpo" and info.argv == ("align", "run", "dpo")
    assert "align-cli" in info.versions


def test_rendezvous_port_defaults() -> None:
    from types import SimpleNamespace

    from align_cli.commands.run import RunOptions, launch_options

    tree = SimpleNamespace(trainer=SimpleNamespace(devices=None, num_nodes=1))
    explicit = launch_options(RunOptions("dpo", nproc_per_node=2, master_port=1234), tree)
    assert explicit.master_port == 1234 and explicit.world_size == 2
    # Several nodes must agree on the port without being told: torchrun's default.
    nodes = launch_options(RunOptions("dpo", nnodes=2), tree)
    assert nodes.master_port == 29500 and nodes.world_size == 2
    # NeMo's trainer.devices / trainer.num_nodes give the launch when no option does.
    tree = SimpleNamespace(trainer=SimpleNamespace(devices=4, num_nodes=1))
    one = launch_options(RunOptions("dpo"), tree)
    assert one.nproc_per_node == 4 and 0 < one.master_port < 65536
    with pytest.raises(UsageError, match="--node-rank 2"):
        launch_options(RunOptions("dpo", nnodes=2, node_rank=2), tree)
