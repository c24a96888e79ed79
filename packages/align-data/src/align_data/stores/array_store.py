"""A per-sample array store: fixed-shape rows, memory-mapped, keyed by a fingerprint.

Made for cached reference log-probs (the ``precompute`` reference strategy): one row per dataset
sample (for example ``[2]`` = chosen and rejected log-prob sums), written once — possibly over
several runs or by several processes of one machine writing disjoint rows — and read every step.

``ArrayStore.open(root, key=..., num_samples=..., shape=..., dtype=...)`` uses the directory
``root/<fingerprint of key, shape and dtype>``: a different model or dataset gives a different key
and therefore a different store, never stale values. A ``filled`` flag per row records which rows
are written; reading a row that was never written is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ArrayStore"]

_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64}


def _fingerprint(key: Mapping[str, Any] | str, shape: tuple[int, ...], dtype: str, n: int) -> str:
    payload = {"key": key, "shape": list(shape), "dtype": dtype, "num_samples": n}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class ArrayStore:
    """Fixed-shape per-sample rows in a memory-mapped ``.npy`` file. Use :meth:`open`.

    Attributes:
        directory: The store directory.
        fingerprint: Hash of key, shape, dtype and size.
        num_samples: Rows.
        shape: Shape of one row.
        dtype: Row dtype name.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        meta = json.loads((directory / "meta.json").read_text())
        self.fingerprint: str = meta["fingerprint"]
        self.num_samples: int = meta["num_samples"]
        self.shape: tuple[int, ...] = tuple(meta["shape"])
        self.dtype: str = meta["dtype"]
        self.key = meta["key"]
        self._values = np.load(directory / "values.npy", mmap_mode="r+")
        self._filled = np.load(directory / "filled.npy", mmap_mode="r+")

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        key: Mapping[str, Any] | str,
        num_samples: int,
        shape: Sequence[int] = (),
        dtype: str = "float32",
    ) -> ArrayStore:
        """Opens the store for ``key``, creating it (all rows unfilled) if needed.

        Args:
            root: Directory holding stores.
            key: What the values depend on (e.g. model and dataset fingerprints); JSON-able.
            num_samples: Number of rows.
            shape: Shape of one row.
            dtype: ``float32``, ``float64``, ``float16`` or ``int64``.

        Returns:
            The store; rows written by earlier runs are kept.
        """
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        shape = tuple(int(s) for s in shape)
        fingerprint = _fingerprint(key, shape, dtype, num_samples)
        directory = Path(root) / fingerprint
        if not (directory / "meta.json").exists():
            tmp = Path(root) / f".tmp-{fingerprint}-{os.getpid()}"
            tmp.mkdir(parents=True, exist_ok=True)
            values = np.lib.format.open_memmap(
                tmp / "values.npy", mode="w+", dtype=_DTYPES[dtype], shape=(num_samples, *shape)
            )
            del values
            filled = np.lib.format.open_memmap(
                tmp / "filled.npy", mode="w+", dtype=np.uint8, shape=(num_samples,)
            )
            del filled
            meta = {
                "fingerprint": fingerprint,
                "key": key,
                "num_samples": num_samples,
                "shape": list(shape),
                "dtype": dtype,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            try:
                tmp.rename(directory)
            except OSError:
                if not (directory / "meta.json").exists():
                    raise
                for path in tmp.iterdir():
                    path.unlink()
                tmp.rmdir()
        return cls(directory)

    def _rows(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise IndexError(f"row indices must lie in [0, {self.num_samples})")
        return rows

    def write(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        values: np.ndarray | torch.Tensor,
    ) -> None:
        """Writes rows and marks them filled.

        Args:
            indices: ``[n]`` sample indices.
            values: ``[n, *shape]`` values.
        """
        rows = self._rows(indices)
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu()
            if values.dtype in (torch.bfloat16, torch.float16):
                values = values.double()
            values = values.numpy()
        values = np.asarray(values)
        if values.shape != (len(rows), *self.shape):
            raise ValueError(
                f"values must have shape {[len(rows), *self.shape]}, got {list(values.shape)}"
            )
        self._values[rows] = values
        self._filled[rows] = 1

    def read(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows as a tensor ``[n, *shape]``.

        Raises:
            KeyError: When a requested row was never written.
        """
        rows = self._rows(indices)
        missing = rows[self._filled[rows] == 0]
        if missing.size:
            shown = ", ".join(map(str, missing[:10].tolist()))
            raise KeyError(
                f"{self.directory}: rows never written: {shown}"
                + (" ..." if missing.size > 10 else "")
            )
        return torch.from_numpy(np.array(self._values[rows]))

    def missing(self) -> np.ndarray:
        """Indices of rows not written yet (what a resumed precompute pass still has to do)."""
        return np.flatnonzero(np.asarray(self._filled) == 0)

    @property
    def num_filled(self) -> int:
        """Rows written so far."""
        return int(np.count_nonzero(self._filled))

    @property
    def complete(self) -> bool:
        """Whether every row is written."""
        return self.num_filled == self.num_samples

    def flush(self) -> None:
        """Flushes values and flags to disk (values before flags)."""
        self._values.flush()
        self._filled.flush()
