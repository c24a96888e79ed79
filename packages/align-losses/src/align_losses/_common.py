"""Shared helpers: compute dtypes and row-chunked iteration over ``[..., V]`` tensors.

The memory-lean functions walk the vocabulary dimension a block of rows at a time, so that no
temporary ever holds more than :data:`CHUNK_ELEMENTS` elements. The iteration never copies its
input, even when the leading dimensions cannot be flattened into a view (for example
``logits[:, :-1]`` of a batch).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: Upper bound on the number of elements a row chunk of a ``[..., V]`` tensor may hold
#: (2**24 elements is 64 MiB in float32). Tests lower it to exercise the chunk boundaries.
CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype arithmetic is carried out in: float64 stays, anything else is float32."""
    return torch.promote_types(dtype, torch.float32)


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` in its compute dtype (a no-op for float32 and float64)."""
    return x.to(compute_dtype(x.dtype))


def _row_blocks(x: Tensor, first_row: int = 0) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, view)`` pairs of 2-D views ``[rows, V]`` that cover ``x`` in order."""
    if x.dim() <= 2:
        yield first_row, x.reshape(-1, x.shape[-1]) if x.dim() == 1 else x
        return
    try:
        flat = x.view(-1, x.shape[-1])
    except RuntimeError:
        flat = None
    if flat is not None:
        yield first_row, flat
        return
    rows_per_item = 1
    for size in x.shape[1:-1]:
        rows_per_item *= size
    for i in range(x.shape[0]):
        yield from _row_blocks(x[i], first_row + i * rows_per_item)


def chunk_rows(x: Tensor, buffers: int = 1) -> int:
    """Rows per chunk used by :func:`row_chunks` for ``x[..., V]`` (at most the row count)."""
    vocab = max(x.shape[-1], 1)
    total = x.numel() // vocab if x.shape[-1] else 0
    return max(1, min(total, CHUNK_ELEMENTS // (vocab * max(buffers, 1))))


def row_chunks(x: Tensor, buffers: int = 1) -> Iterator[tuple[slice, Tensor]]:
    """Iterate over ``x[..., V]`` as 2-D row chunks without copying it.

    Args:
        x: tensor whose last dimension is the vocabulary.
        buffers: how many chunk-sized temporaries the caller allocates per chunk; the chunk is
            made smaller accordingly so the total stays near :data:`CHUNK_ELEMENTS`.

    Yields:
        ``(rows, chunk)``: the slice of flattened row indices and a ``[len(rows), V]`` view.
        No chunk has more than ``chunk_rows(x, buffers)`` rows.
    """
    step = chunk_rows(x, buffers)
    for first, block in _row_blocks(x):
        for start in range(0, block.shape[0], step):
            chunk = block[start : start + step]
            yield slice(first + start, first + start + chunk.shape[0]), chunk


class Workspace:
    """One reusable ``[rows, cols]`` buffer: views of it replace per-chunk temporaries.

    Allocating a fresh chunk-sized tensor per chunk costs page faults on every chunk on CPU;
    reusing one buffer for the whole call avoids that.
    """

    def __init__(self, cols: int, dtype: torch.dtype, device: torch.device) -> None:
        self._cols, self._dtype, self._device = cols, dtype, device
        self._buf: Tensor | None = None

    def rows(self, n: int) -> Tensor:
        """Return an uninitialised ``[n, cols]`` view, growing the buffer if needed."""
        if self._buf is None or self._buf.shape[0] < n:
            self._buf = torch.empty(n, self._cols, dtype=self._dtype, device=self._device)
        return self._buf[:n]


def gradient_row_chunks(
    grad: Tensor, x: Tensor, dtype: torch.dtype
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Iterate over ``x[..., V]`` by :func:`row_chunks` to fill ``grad`` (shaped like ``x``).

    Args:
        grad: contiguous output, ``x``'s shape and dtype.
        x: tensor whose last dimension is the vocabulary.
        dtype: the dtype the caller computes each chunk's gradient in.

    Yields:
        ``(rows, chunk, buf)``: a row chunk of ``x`` and the ``[len(rows), V]`` buffer to write its
        gradient into, in ``dtype``. ``buf`` is the matching rows of ``grad`` itself when
        ``dtype`` is ``grad``'s, else a reused workspace copied into ``grad`` once the caller
        resumes the iteration.
    """
    grad_rows = grad.view(-1, x.shape[-1])
    work = None if dtype == grad.dtype else Workspace(x.shape[-1], dtype, x.device)
    for rows, chunk in row_chunks(x):
        out = grad_rows[rows]
        buf = out if work is None else work.rows(chunk.shape[0])
        yield rows, chunk, buf
        if work is not None:
            out.copy_(buf)
