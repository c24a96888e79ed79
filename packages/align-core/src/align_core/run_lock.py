"""Exclusive locks on run directories and checkpoint directories (``fcntl.flock``).

Two runs writing into one run directory lose each other's metrics and checkpoints, so the
process that launches a run holds `RunDirLock` for the whole run (its workers included: they
are its children and it waits for them). The lock is an ``flock`` on ``<run_dir>/.lock``: the
kernel releases it when the holder exits, however it exits, so a crashed run never leaves a
stale lock behind. The file records the holder's pid, which a refused second run names.

`exclusive_lock` is the primitive, also used by `align_core.checkpoint.Checkpointer` on its
directory around each save, so that a save never deletes the temporary directory of another
save in progress.
On a filesystem without ``flock`` support the locks are not taken (nothing is refused).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

__all__ = [
    "LOCK_FILE",
    "RunDirBusyError",
    "RunDirLock",
    "check_run_dir_free",
    "exclusive_lock",
    "lock_holder",
]

LOCK_FILE = ".lock"
"""Name of the lock file inside a run directory."""

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirBusyError(RuntimeError):
    """Another live process holds the run directory's lock; the message names its pid."""


def lock_holder(path: str | os.PathLike[str]) -> int | None:
    """The pid recorded in lock file ``path``, or None when there is none (or it is unreadable)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], *, blocking: bool) -> Iterator[int | None]:
    """Hold an exclusive ``flock`` on ``path`` for the ``with`` block.

    Args:
        path: The lock file (created when missing), or a directory (locked itself).
        blocking: Wait for a holder to release it; otherwise raise `BlockingIOError` at once.

    Yields:
        The lock file's descriptor, or None when the filesystem does not support ``flock``
        (then nothing is locked).

    Raises:
        BlockingIOError: ``blocking`` is False and another process holds the lock.
    """
    if os.path.isdir(path):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BlockingIOError(exc.errno, f"{path} is locked") from None
            if exc.errno not in _UNSUPPORTED:
                raise
            yield None
            return
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _busy(run_dir: Path) -> RunDirBusyError:
    holder = lock_holder(run_dir / LOCK_FILE)
    who = f"process {holder}" if holder is not None else "another process"
    return RunDirBusyError(
        f"{run_dir} is in use by {who} (another run writes there; wait for it to end or give "
        "another exp_manager.explicit_log_dir)"
    )


def check_run_dir_free(run_dir: str | os.PathLike[str]) -> None:
    """Refuse early, before reading a run directory's checkpoints, when another run holds it.

    Creates nothing; `RunDirLock` is what holds the directory afterwards.

    Raises:
        RunDirBusyError: Another live process holds its lock (naming its pid).
    """
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return
    try:
        with exclusive_lock(path, blocking=False):
            pass
    except BlockingIOError:
        raise _busy(Path(run_dir)) from None


class RunDirLock:
    """An exclusive lock on a run directory, held by the process that launches the run.

    Use as a context manager; the directory is created when missing. The pid of the holder is
    written into ``<run_dir>/.lock`` and cleared on release.

    Args:
        run_dir: The run directory.

    Raises:
        RunDirBusyError: On entry, when another live process holds the lock (naming its pid).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._stack: contextlib.ExitStack | None = None
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stack = contextlib.ExitStack()
        try:
            fd = stack.enter_context(exclusive_lock(self.path, blocking=False))
        except BlockingIOError:
            stack.close()
            raise _busy(self.run_dir) from None
        if fd is not None:
            _write_pid(fd)
        self._stack, self._fd = stack, fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, fd = self._stack, self._fd
        self._stack = self._fd = None
        if stack is None:
            return
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no holder any more (the file stays: see the module)
        stack.close()


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.fsync(fd)
