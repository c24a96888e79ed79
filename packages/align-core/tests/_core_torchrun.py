"""Launch a test script under a 2-process ``torchrun`` (gloo, CPU) from a pytest process.

The distributed tests of this package each run one script under torchrun, then read what the
ranks wrote back. This module holds the launch they share: a free rendezvous port, an
environment without the launcher variables of any enclosing run, one OpenMP thread per rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from align_core import free_port

__all__ = ["LAUNCHER_ENV", "run_torchrun"]

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Variables an enclosing torchrun sets; inherited, they would confuse the child launch."""


def run_torchrun(
    script: Path, *args: str | Path, timeout: float, nproc: int = 2
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under ``torch.distributed.run`` on this host and wait for it.

    Args:
        script: The Python script each rank runs.
        *args: Command-line arguments passed to the script (paths are converted to strings).
        timeout: Seconds before the launch is killed (``subprocess.TimeoutExpired``).
        nproc: Number of processes (ranks) to start.

    Returns:
        The finished process, with ``stdout`` and ``stderr`` captured as text; the caller checks
        ``returncode``.
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(script),
        *(str(arg) for arg in args),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
