"""Safe reading and atomic writing of the `.nemo` tar container.

A NeMo 1.x `.nemo` file is a tar archive (uncompressed; old files are gzip-compressed) whose
members are written relative to ``.``: ``./model_config.yaml``, ``./model_weights.ckpt`` and so on.
Reading validates every member before anything is extracted: absolute paths, ``..`` components,
links, devices and FIFOs are rejected with an error naming the member, and a member whose data
runs past the end of the file is reported as truncated. Writing goes to a temporary file in the
destination directory which is renamed over the destination only once it is complete, so a crash
never leaves a half-written `.nemo` behind under the final name.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from align_core.nemo.errors import NemoFormatError

__all__ = ["atomic_output", "extract_nemo", "list_members", "write_archive"]


def _normalise(name: str) -> str:
    """Member name without a leading ``./`` (``"."`` for the root entry)."""
    while name.startswith("./"):
        name = name[2:]
    return name or "."


def _check_member(path: Path, member: tarfile.TarInfo, file_size: int | None) -> None:
    name = member.name
    if name.startswith("/") or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise NemoFormatError(f"{path}: unsafe member {name!r}: absolute path")
    if ".." in posixpath.normpath(name).split("/") or ".." in name.split("/"):
        raise NemoFormatError(f"{path}: unsafe member {name!r}: path escapes the archive ('..')")
    if member.issym() or member.islnk():
        raise NemoFormatError(
            f"{path}: unsafe member {name!r}: links are not allowed (points to {member.linkname!r})"
        )
    if not (member.isfile() or member.isdir()):
        raise NemoFormatError(
            f"{path}: unsafe member {name!r}: only regular files and directories are allowed"
        )
    if file_size is not None and member.isfile() and member.offset_data + member.size > file_size:
        raise NemoFormatError(
            f"{path}: truncated: member {name!r} needs {member.size} bytes from offset "
            f"{member.offset_data} but the file has only {file_size} bytes"
        )


def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise NemoFormatError(f"{path}: not a readable .nemo tar archive ({exc})") from exc


def _members(path: Path, tar: tarfile.TarFile, compressed: bool) -> list[tarfile.TarInfo]:
    file_size = None if compressed else path.stat().st_size
    members: list[tarfile.TarInfo] = []
    try:
        while (member := tar.next()) is not None:
            members.append(member)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if members:
            _check_member(path, members[-1], file_size)  # names the member cut short, if any
            raise NemoFormatError(
                f"{path}: truncated or corrupt tar archive after member {members[-1].name!r} "
                f"({exc})"
            ) from exc
        raise NemoFormatError(f"{path}: truncated or corrupt tar archive ({exc})") from exc
    if not members:
        raise NemoFormatError(f"{path}: empty archive")
    for member in members:
        _check_member(path, member, file_size)
    return members


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def list_members(path: str | os.PathLike[str]) -> list[str]:
    """Names of the regular files in a `.nemo` archive, without the ``./`` prefix.

    Every member is validated as in `extract_nemo`.

    Raises:
        NemoFormatError: For an unsafe, truncated or unreadable archive.
    """
    path = Path(path)
    with _open(path) as tar:
        members = _members(path, tar, _is_gzip(path))
    return [_normalise(m.name) for m in members if m.isfile()]


def extract_nemo(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Validate and extract a `.nemo` archive (plain or gzip tar) into ``dest``.

    Args:
        path: The `.nemo` file.
        dest: Directory to extract into (created if missing).

    Returns:
        ``dest`` as a `Path`.

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        NemoFormatError: For absolute or ``..`` member paths, links, devices, truncated data or
            an unreadable archive; the message names the member.
    """
    path, dest = Path(path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with _open(path) as tar:
        members = _members(path, tar, _is_gzip(path))
        for member in members:
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, dest, filter="data")
                else:  # pragma: no cover - Python < 3.11.4; members were validated above
                    tar.extract(member, dest)
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise NemoFormatError(
                    f"{path}: truncated or corrupt data in member {member.name!r} ({exc})"
                ) from exc
    return dest


def _reset_info(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Owner-free, timestamp-free member metadata, so equal contents give equal archives."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o755 if info.isdir() else 0o644
    return info


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    On an exception the temporary file is removed and ``path`` is left untouched. The file gets
    the mode any other new file would (``0o666`` less the umask; an existing ``path`` keeps
    its mode), not the private ``0o600`` of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0o022)  # reading the umask sets it: put it back at once
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp_name, mode)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_archive(src_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Pack ``src_dir`` into an uncompressed tar at ``path`` in NeMo's ``./`` member layout.

    Members are added in sorted order with zeroed owners and timestamps, so the same directory
    contents always give the same bytes. The archive is written to a temporary file and renamed.

    Args:
        src_dir: Directory whose contents become the archive root.
        path: Destination `.nemo` file.

    Returns:
        ``path`` as a `Path`.
    """
    src_dir = Path(src_dir)
    with atomic_output(path) as tmp, tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as tar:
        tar.add(src_dir, arcname=".", recursive=False, filter=_reset_info)
        for entry in sorted(src_dir.rglob("*")):
            arcname = "./" + entry.relative_to(src_dir).as_posix()
            tar.add(entry, arcname=arcname, recursive=False, filter=_reset_info)
    return Path(path)
