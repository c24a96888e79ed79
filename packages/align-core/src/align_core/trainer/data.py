"""The trainer's data source: tokenized examples in, this rank's micro-batches of a step out.

`TrainData` implements `align_core.trainer.loop.BatchSource` over in-memory lists of align-data
examples. The order of training examples is a pure function of ``(seed, epoch)`` and the
position in the run is the number of consumed examples, so resuming from ``consumed_samples``
gives exactly the batches an uninterrupted run would have seen.

Global batch ``k`` of epoch ``e`` is ``order_e[k·G : (k+1)·G]`` (``G`` = global batch size,
``order_e`` a seeded permutation, or the identity without shuffling; an incomplete last batch
is dropped). An epoch is ``epoch_batches`` global batches: the trainer's ``steps_per_epoch``,
fewer than the complete batches under ``limit_train_batches < 1``; the next epoch then starts at
the head of its own order, so the epoch the trainer logs is the epoch the data comes from.
Data-parallel rank ``d`` takes the contiguous slice ``[d·G/D : (d+1)·G/D]`` and splits it
into micro-batches of ``micro_batch_size``. Each micro-batch is padded to its own longest row,
or, with ``uniform_length`` (pipeline parallelism, which exchanges activations of one fixed
shape, and packed rows), every micro-batch of the step to the step's longest row on this rank.

Each model batch carries ``cache_rows`` (the reference cache rows of its examples, see
`align_core.reference.PrecomputedReference`): the dataset index, or for per-epoch caches
(KTO, whose KL samples pair examples differently each epoch)
``epoch × num_examples + index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from align_core.algorithms._common import pad_model_batch
from align_core.algorithms._packed import pad_packed_model_batch
from align_core.algorithms.contract import AlgorithmStep, ModelBatch

__all__ = ["TrainData", "epoch_order"]


def epoch_order(num_examples: int, *, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order of the examples in ``epoch`` (a seeded permutation, or the identity)."""
    if not shuffle:
        return np.arange(num_examples)
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_examples)


@dataclass
class TrainData:
    """This data-parallel rank's view of the training and validation examples.

    Attributes:
        train: Tokenized training examples (``index`` = position in this list).
        val: Tokenized validation examples.
        algorithm: Builds model batches from examples.
        collate: align-data collate settings (pad id, rewards defaults, ...).
        micro_batch_size: Examples per micro-batch.
        global_batch_size: Examples per optimizer step over all data-parallel ranks.
        data_parallel_rank: This rank's data-parallel index.
        data_parallel_size: Data-parallel ranks.
        seed: Seed of the training order.
        shuffle: Shuffle the training order each epoch.
        per_epoch_cache_rows: Reference cache rows per epoch (KTO) instead of per example.
        pad_multiple: Round each micro-batch's row length up to a multiple of this.
        uniform_length: Pad every micro-batch of a step to one length (the step's longest row
            on this rank): needed by pipeline parallelism and done for packed rows. False pads
            each micro-batch to its own longest row, so a short micro-batch costs less.
        pack_capacity: Pack examples into rows of this many positions (None: pad, one
            sequence per row).
        epoch_batches: Global batches per epoch, the trainer's ``steps_per_epoch`` (fewer than
            the complete batches under ``limit_train_batches``); None: every complete batch.
    """

    train: Sequence[Any]
    val: Sequence[Any]
    algorithm: AlgorithmStep
    collate: Any
    micro_batch_size: int
    global_batch_size: int
    data_parallel_rank: int = 0
    data_parallel_size: int = 1
    seed: int = 1234
    shuffle: bool = True
    per_epoch_cache_rows: bool = False
    pad_multiple: int = 1
    uniform_length: bool = True
    pack_capacity: int | None = None
    epoch_batches: int | None = None

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"model.global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size × data-parallel size = {self.micro_batch_size} × "
                f"{self.data_parallel_size}"
            )
        if self.epoch_batches is not None and not 0 < self.epoch_batches <= self.batches_per_epoch:
            raise ValueError(
                f"TrainData.epoch_batches {self.epoch_batches} must be in [1, "
                f"{self.batches_per_epoch}] (the complete global batches of {len(self.train)} "
                f"examples at global batch size {self.global_batch_size})"
            )

    @property
    def train_samples(self) -> int:
        """Training examples per epoch."""
        return len(self.train)

    @property
    def batches_per_epoch(self) -> int:
        """Complete global batches per epoch."""
        return len(self.train) // self.global_batch_size

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch: ``epoch_batches``, else all complete ones."""
        return self.batches_per_epoch if self.epoch_batches is None else self.epoch_batches

    @property
    def num_val_batches(self) -> int:
        """Complete validation global batches."""
        return len(self.val) // self.global_batch_size

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per rank per step."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def epoch_of(self, consumed_samples: int) -> int:
        """Epoch of the global batch that follows ``consumed_samples`` examples."""
        return consumed_samples // (self.steps_per_epoch * self.global_batch_size)

    def train_indices(self, consumed_samples: int) -> np.ndarray:
        """Dataset indices of the whole global batch after ``consumed_samples`` (all ranks)."""
        per_epoch = self.steps_per_epoch * self.global_batch_size
        if per_epoch == 0:
            raise ValueError(
                f"{len(self.train)} training examples do not fill one global batch of "
                f"{self.global_batch_size}"
            )
        if consumed_samples % self.global_batch_size:
            raise ValueError(
                f"consumed_samples {consumed_samples} is not a multiple of the global batch "
                f"size {self.global_batch_size} (was the batch size changed on resume?)"
            )
        epoch, offset = divmod(consumed_samples, per_epoch)
        order = epoch_order(len(self.train), epoch=epoch, seed=self.seed, shuffle=self.shuffle)
        return order[offset : offset + self.global_batch_size]

    def _rank_share(self, indices: np.ndarray) -> np.ndarray:
        share = len(indices) // self.data_parallel_size
        return indices[self.data_parallel_rank * share : (self.data_parallel_rank + 1) * share]

    def _micro_batches(
        self, examples: Sequence[Any], indices: np.ndarray, rows: np.ndarray
    ) -> list[ModelBatch]:
        mbs = self.micro_batch_size
        batches = []
        for start in range(0, len(indices), mbs):
            chunk = [examples[int(i)] for i in indices[start : start + mbs]]
            if self.pack_capacity is None:
                batch = self.algorithm.build_micro_batch(chunk, self.collate)
            else:
                batch = self.algorithm.build_packed_micro_batch(
                    chunk, self.collate, self.pack_capacity
                )
            batch["cache_rows"] = torch.as_tensor(rows[start : start + mbs], dtype=torch.long)
            batches.append(batch)
        if self.pack_capacity is None and not self.uniform_length:
            return [
                pad_model_batch(b, self._padded(b), pad_id=self.collate.pad_id) for b in batches
            ]
        length = max(self._padded(b) for b in batches)
        if self.pack_capacity is None:
            return [pad_model_batch(b, length, pad_id=self.collate.pad_id) for b in batches]
        rows_max = max(b["tokens"].shape[0] for b in batches)
        return [
            pad_packed_model_batch(b, rows_max, length, pad_id=self.collate.pad_id) for b in batches
        ]

    def _padded(self, batch: ModelBatch) -> int:
        """``batch``'s row length rounded up to ``pad_multiple``."""
        return -(-batch["tokens"].shape[-1] // self.pad_multiple) * self.pad_multiple

    def train_micro_batches(self, consumed_samples: int) -> list[ModelBatch]:
        """This rank's micro-batches of the global batch after ``consumed_samples``."""
        indices = self._rank_share(self.train_indices(consumed_samples))
        rows = indices
        if self.per_epoch_cache_rows:
            rows = indices + self.epoch_of(consumed_samples) * len(self.train)
        return self._micro_batches(self.train, indices, rows)

    def val_micro_batches(self, index: int) -> list[ModelBatch]:
        """This rank's micro-batches of validation global batch ``index`` (fixed order)."""
        g = self.global_batch_size
        indices = self._rank_share(np.arange(index * g, (index + 1) * g))
        return self._micro_batches(self.val, indices, indices)
