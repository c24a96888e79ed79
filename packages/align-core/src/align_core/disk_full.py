"""A full disk while writing a checkpoint or an export: one clear error, nothing lost.

Every writer in align-core writes under a temporary name and renames when complete, so a write
that runs out of space leaves what was on disk before untouched. `disk_full_guard` turns a
failed write into a `DiskFullError` when it is an ``OSError(ENOSPC)`` (raised directly, or
wrapped by megatron's or torch's checkpoint writers), or any write error on a destination left
with under 1 MiB free (torch's zip writer reports a short write as ``unexpected pos``, without
the errno). The message says what was being written, where, how much space it needs and has,
and what is intact; ``align`` reports it as one line and exits 1.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EXPORT_INTACT",
    "DiskFullError",
    "dir_bytes",
    "disk_full_guard",
    "disk_full_message",
    "format_size",
    "is_disk_full",
    "tensor_bytes",
]

EXPORT_INTACT = (
    "nothing already there was replaced, and a run's checkpoints are intact (free space, then "
    "`align ckpt export RUN_DIR`)"
)
"""The end of the message of a failed export: exports are written aside and renamed."""

_FULL = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
_NEARLY_FULL = 1 << 20
"""Free bytes under which a failed write counts as a full disk whatever its error says."""


class DiskFullError(RuntimeError):
    """No space left while writing a checkpoint or an export; the message says what and where."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the per-rank failures torch's checkpoint gathers."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        failures = getattr(current, "failures", None)  # torch's CheckpointException
        if isinstance(failures, dict):
            todo.extend(e for e in failures.values() if isinstance(e, BaseException))
        todo.extend(a for a in getattr(current, "args", ()) if isinstance(a, BaseException))


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it wraps) is a full disk or an exceeded quota."""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _FULL:
            return True
        if any(text in str(cause) for text in _FULL_TEXT):
            return True
    return False


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested state dict (sharded tensors count their local data)."""
    if isinstance(state, Mapping):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(tensor_bytes(v) for v in state)
    data = getattr(state, "data", state)
    if isinstance(data, torch.Tensor):
        return data.numel() * data.element_size()
    return 0


def format_size(n: float) -> str:
    """``n`` bytes as ``12.3 MB`` (powers of 1000; bytes below 1 kB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _free_bytes(where: Path) -> int | None:
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _where(exc: BaseException, default: Path) -> Path:
    """The directory of the file that could not be written, when the error names it."""
    for cause in _causes(exc):
        name = getattr(cause, "filename", None)
        if isinstance(cause, OSError) and cause.errno in _FULL and name:
            return Path(os.fsdecode(name)).parent
    return default


def disk_full_message(
    what: str, where: Path, *, needed: int | None, intact: str, exc: BaseException
) -> str:
    """The one-line message of a `DiskFullError` (see `disk_full_guard`)."""
    place = _where(exc, where)
    sizes = []
    if needed:
        sizes.append(f"about {format_size(needed)} needed")
    free = _free_bytes(place)
    if free is not None:
        sizes.append(f"{format_size(free)} free")
    amount = f" ({', '.join(sizes)})" if sizes else ""
    return f"disk full while writing {what} in {place}{amount}; {intact}"


@contextlib.contextmanager
def disk_full_guard(
    what: str,
    where: str | os.PathLike[str],
    *,
    intact: str,
    needed: Callable[[], int | None] | None = None,
    cleanup: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Turn a full disk inside the block into a `DiskFullError`; other errors pass unchanged.

    Args:
        what: What was being written (``"checkpoint step_000004"``, ``"final.nemo"``).
        where: The destination directory (the failing file's own directory wins when the
            error names it).
        intact: What is still intact, ending the message (``"the previous checkpoint
            step_000002 is intact"``).
        needed: Returns the bytes the write needs, if known (called only on failure).
        cleanup: Frees what the failed write left (its temporary files) before the free
            space is measured.

    Raises:
        DiskFullError: The block ran out of space (chained to the original error).
    """
    try:
        yield
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        if not isinstance(exc, Exception) and type(exc).__name__ != "CheckpointException":
            raise
        free = _free_bytes(_where(exc, Path(where)))
        if not (is_disk_full(exc) or (free is not None and free < _NEARLY_FULL)):
            raise
        if cleanup is not None:
            cleanup()
        size = needed() if needed is not None else None
        raise DiskFullError(
            disk_full_message(what, Path(where), needed=size, intact=intact, exc=exc)
        ) from exc
