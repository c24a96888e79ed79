"""The ``precompute`` strategy: reference log-probs computed once before training, on disk.

`precompute_reference` runs one forward pass over the data while the policy still holds the
reference (initial) weights and fills align-data's fingerprinted `ArrayStore` per split;
`PrecomputedReference` reads it per step: zero reference cost during training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from align_core.algorithms._common import ModelBatch
from align_core.reference.base import Strategy, reference_forward
from align_core.schedule import ForwardFn

if TYPE_CHECKING:
    from align_data import ArrayStore

__all__ = ["PrecomputedReference", "precompute_reference"]


class PrecomputedReference:
    """Reference log-probs read from an on-disk cache filled before training.

    The cache is align-data's `ArrayStore` per split, one row ``[2]`` per cache row (the
    reference sums of sequences ``i`` and ``b + i`` of the example's micro-batch: chosen and
    rejected, or a KTO sample and its KL sample), keyed by a fingerprint of the reference
    weights, the data and the batch layout, so a different model or dataset can never read
    stale values. Model batches name their rows in ``cache_rows``.
    """

    strategy: Strategy = "precompute"

    def __init__(self, stores: Mapping[str, ArrayStore], fingerprint: str) -> None:
        """Read from ``stores`` (``"train"``/``"val"``), filled by `precompute_reference`."""
        self._stores = dict(stores)
        self._fingerprint = fingerprint

    def logps(self, micro_batches: Sequence[ModelBatch], *, split: str) -> list[Tensor]:
        """Rows of the micro-batches' examples, laid out as ``[first halves, second halves]``."""
        store = self._stores[split]
        out = []
        for mb in micro_batches:
            rows = store.read(mb["cache_rows"]).to(torch.float32)
            out.append(torch.cat([rows[:, 0], rows[:, 1]]).to(mb["tokens"].device))
        return out

    def refresh(self, alpha: float = 1.0) -> None:
        """Not possible: the cached log-probs belong to fixed reference weights.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(
            "the precompute reference is a cache of log-probs computed once before training "
            "and cannot be refreshed; a reference that follows the policy (SPIN, TR-DPO) needs "
            "model.reference.strategy=swap or model"
        )

    def state(self) -> dict[str, str]:
        """Strategy and cache fingerprint."""
        return {"strategy": self.strategy, "fingerprint": self._fingerprint}


def precompute_reference(
    model: torch.nn.Module,
    forward_fn: ForwardFn,
    *,
    root: str | Path,
    key: Mapping[str, object],
    splits: Mapping[str, tuple[int, Callable[[], Iterable[Iterable[list[ModelBatch]]]]]],
    writer: bool,
    merge: int = 1,
    progress: bool = False,
    status: Callable[[str], None] | None = None,
    steps: Mapping[str, int] | None = None,
) -> PrecomputedReference:
    """Fill (or reuse) the reference cache with one forward pass of ``model`` over the data.

    Call it on every rank while ``model`` still holds the reference (initial) weights, with the
    same batch sequence the run will train on: the cached values are then bitwise those an
    online reference would compute. Rows already in the cache (an earlier, possibly interrupted
    run with the same key) are not recomputed. Each epoch of batches is an "all rows seen once"
    unit: the filled set is refreshed from disk between epochs, so a row is computed once.

    Args:
        model: The policy chunk holding the reference weights.
        forward_fn: Per-micro-batch forward returning token log-probs.
        root: Cache directory.
        key: What the values depend on (reference fingerprint, data, layout); JSON-able.
        splits: ``split -> (number of rows, factory of an iterator over epochs)``; each epoch is
            an iterator of this rank's per-step micro-batch lists.
        writer: Whether this rank writes (last pipeline stage, tensor-parallel rank 0).
        merge: Micro-batches per forward.
        progress: Print this rank's progress to stderr (`align_data.ProgressPrinter`), once a
            split has rows to compute; give it on one rank only.
        status: Told once, before the first step is computed (not when the cache is full).
        steps: Steps each split's epochs hold in all (the progress total; unknown without).

    Returns:
        The reference reading from the filled cache.
    """
    from align_data import ProgressPrinter

    stores: dict[str, ArrayStore] = {}
    announced = False
    fingerprint = hashlib.blake2b(repr(sorted(key.items())).encode(), digest_size=16).hexdigest()
    for split, (num_rows, epochs) in splits.items():
        store = _open_store(root, {**key, "split": split}, num_rows)
        printer: ProgressPrinter | None = None
        seen = 0
        for epoch in epochs():
            filled = np.ones(num_rows, dtype=bool)
            filled[store.missing()] = False
            for micro_batches in epoch:
                seen += 1
                if printer is not None:
                    printer.update(1)
                rows = torch.cat([mb["cache_rows"] for mb in micro_batches]).numpy()
                if filled[rows].all():
                    continue
                if printer is None:
                    if status is not None and not announced:
                        status(f"precomputing reference log-probs (cache: {root})")
                        announced = True
                    printer = ProgressPrinter(
                        (steps or {}).get(split, 0),
                        desc=f"reference log-probs ({split})",
                        unit="steps",
                        enabled=progress,
                    )
                    printer.done = seen  # steps already cached count as done, unprinted
                logps = reference_forward(model, micro_batches, forward_fn, merge=merge)
                for mb, lp in zip(micro_batches, logps, strict=True):
                    if writer:
                        b = lp.numel() // 2
                        store.write(mb["cache_rows"], torch.stack([lp[:b], lp[b:]], dim=1))
                filled[rows] = True
            store.flush()
            if dist.is_initialized():
                dist.barrier()
        if printer is not None:
            printer.close()
        stores[split] = store
    return PrecomputedReference(stores, fingerprint)


def _open_store(root: str | Path, key: Mapping[str, object], num_rows: int) -> ArrayStore:
    from align_data import ArrayStore

    def open_() -> ArrayStore:
        return ArrayStore.open(root, key=dict(key), num_samples=num_rows, shape=(2,))

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return open_()
    if dist.get_rank() == 0:
        store = open_()
        dist.barrier()
        return store
    dist.barrier()
    return open_()
