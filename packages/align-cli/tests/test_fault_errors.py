"""Exit statuses of the faults around a run: a busy run directory, a damaged checkpoint, a
full disk (the real exceptions of align-core, reported by class name)."""

from __future__ import annotations

import pytest

from align_cli.errors import expected_failure


def _errors() -> dict[str, type[Exception]]:
    from align_core.checkpoint_checks import DamagedCheckpointError
    from align_core.disk_full import DiskFullError
    from align_core.run_lock import RunDirBusyError

    return {
        "busy": RunDirBusyError,
        "damaged": DamagedCheckpointError,
        "disk": DiskFullError,
    }


@pytest.mark.parametrize(("kind", "status"), [("busy", 2), ("damaged", 2), ("disk", 1)])
def test_fault_statuses(kind: str, status: int) -> None:
    error = _errors()[kind]
    assert expected_failure(error("what happened")) == (status, "what happened")
    broadcast = RuntimeError(f"rank 0 failed: {error.__name__}: what happened")
    assert expected_failure(broadcast) == (status, "what happened")
