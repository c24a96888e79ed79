"""``python -m align_cli.torchrun [TORCHRUN OPTIONS] --module align_cli.worker RUN_DIR``.

torch.distributed.run (torchrun) with align's exit statuses and without its failure report.
Plain torchrun turns any failed worker into a ``ChildFailedError`` traceback and table and exits
1, the status align reserves for a non-finite loss. align's workers report their own errors
(bad input: one ``error:`` line from rank 0, exit 2; a non-finite loss: exit 1; SIGTERM after a
checkpoint: 143), so this launcher runs torchrun's own ``run`` in-process and exits with the
workers' status: 2 when any worker exited 2 (bad input is the cause, the others were stopped
because of it), else the first failure's status (``128 + N`` for a worker killed by signal N,
which it names, as nothing else would). A SIGTERM or SIGINT to this process is passed on to the
workers by torchrun, which then exits ``128 + N``. torchrun's own log lines are hidden unless
``ALIGN_DEBUG=1``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence

__all__ = ["exit_status", "main"]

_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")


def exit_status(codes: Sequence[int]) -> int:
    """The status of a failed launch from its workers' exit codes, the first failure first.

    A code ``-N`` (killed by signal N) counts as ``128 + N``; 2 (bad input) wins over the rest.
    """
    statuses = [128 - code if code < 0 else code for code in codes]
    if 2 in statuses:
        return 2
    return next((status for status in statuses if status), 1)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _quiet_torchrun() -> None:
    """Hide the launcher's log lines: align's workers report what they describe."""
    if os.environ.get("ALIGN_DEBUG") == "1":
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(_LOGGERS):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv`` (its command line); return align's exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _quiet_torchrun()
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    _quiet_torchrun()  # loggers created while parsing
    try:
        run(args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
        codes = [failure.exitcode for _, failure in failures]
        status = exit_status(codes)
        for rank, failure in failures:
            if failure.exitcode < 0 and status != 2:
                print(
                    f"error: rank {rank} was killed by {_signal_name(failure.exitcode)}",
                    file=sys.stderr,
                    flush=True,
                )
        return status
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
