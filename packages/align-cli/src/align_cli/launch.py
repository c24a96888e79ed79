"""Starting the worker processes: in this process, through torchrun, or under Slurm ``srun``.

- Under a launcher (torchrun's ``RANK``/``WORLD_SIZE``, or Slurm's ``SLURM_PROCID``/
  ``SLURM_NTASKS`` inside an ``srun`` step) this process *is* one rank: the worker runs here.
  Under Slurm, ``MASTER_ADDR`` defaults to the first host of the job's node list and
  ``MASTER_PORT`` to a port derived from the job id, so ``srun align run dpo ...`` needs no
  extra setup (one task per GPU).
- Otherwise, with more than one process asked for (``--nproc-per-node``/``--nnodes``, or NeMo's
  ``trainer.devices``/``trainer.num_nodes``), torchrun (through `align_cli.torchrun`, which
  keeps the workers' exit status and hides torchrun's failure report) re-invokes
  `align_cli.worker` on the resolved run directory; SIGINT/SIGTERM are forwarded to it.
- Otherwise the worker runs in this process.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "DEFAULT_MASTER_PORT",
    "LaunchOptions",
    "first_host",
    "free_port",
    "launcher",
    "prepare_slurm_env",
    "run_torchrun",
    "torchrun_command",
    "world_rank",
]

Launcher = Literal["torchrun", "slurm"]

DEFAULT_MASTER_PORT = 29500
"""torchrun's default rendezvous port, used when several nodes must agree without being told."""


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LaunchOptions:
    """How many processes to start and how they meet (torchrun's options).

    Attributes:
        nproc_per_node: Processes on this node.
        nnodes: Nodes.
        node_rank: This node's rank.
        master_addr: Address of node 0.
        master_port: Port on node 0.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def world_size(self) -> int:
        """Total processes."""
        return self.nproc_per_node * self.nnodes


def launcher(env: dict[str, str] | None = None) -> Launcher | None:
    """The launcher this process runs under, if any."""
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    in_step = "SLURM_PROCID" in env and "SLURM_STEP_ID" in env
    if in_step and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return None


def world_rank(env: dict[str, str] | None = None) -> int:
    """This process's global rank under any launcher (0 when there is none)."""
    env = dict(os.environ) if env is None else env
    for name in ("RANK", "SLURM_PROCID"):
        if name in env:
            return int(env[name])
    return 0


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[03-05,9],gpu1`` -> ``node03``)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read Slurm node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def prepare_slurm_env(env: MutableMapping[str, str] | None = None) -> None:
    """Fill ``MASTER_ADDR``/``MASTER_PORT``/``LOCAL_RANK`` from Slurm's environment if unset.

    Args:
        env: The environment to read and fill; default ``os.environ``.
    """
    if env is None:
        env = os.environ
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        env["MASTER_ADDR"] = first_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        env["MASTER_PORT"] = str(20000 + job % 20000)
    if "LOCAL_RANK" not in env and "SLURM_LOCALID" in env:
        env["LOCAL_RANK"] = env["SLURM_LOCALID"]


def torchrun_command(options: LaunchOptions, run_dir: Path, *, quiet: bool = False) -> list[str]:
    """The torchrun command line that starts `align_cli.worker` on ``run_dir``.

    It runs `align_cli.torchrun` (torchrun with align's exit statuses); ``quiet`` is passed on
    to the workers (``--quiet``: no progress bar or summary).
    """
    command = [
        sys.executable,
        "-m",
        "align_cli.torchrun",
        f"--nproc-per-node={options.nproc_per_node}",
        f"--nnodes={options.nnodes}",
        f"--node-rank={options.node_rank}",
        f"--master-addr={options.master_addr}",
        f"--master-port={options.master_port}",
        "--module",
        "align_cli.worker",
        str(run_dir),
    ]
    if quiet:
        command.append("--quiet")
    return command


def run_torchrun(options: LaunchOptions, run_dir: Path, *, quiet: bool = False) -> int:
    """Run the workers through torchrun and return its exit status.

    SIGTERM received by this process is passed on to torchrun, which passes it to the workers
    (they save a checkpoint and exit). SIGINT (Ctrl-C) already reaches the whole foreground
    process group, so this process only waits for torchrun to finish.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.nproc_per_node)))
    proc = subprocess.Popen(torchrun_command(options, run_dir, quiet=quiet), env=env)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous_term = signal.signal(signal.SIGTERM, forward)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
