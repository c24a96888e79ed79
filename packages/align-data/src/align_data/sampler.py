"""A deterministic, data-parallel-aware batch sampler that resumes from ``consumed_samples``.

Global batch = ``micro_batch_size * accumulation_steps * data_parallel_size`` samples. Epoch
``e`` visits the samples in the order of a permutation seeded by ``(seed, e)`` (or in order without
shuffling); its ``num_samples // global_batch_size`` global batches are consecutive slices of that
order, and the remainder is dropped (a different remainder every epoch).

Within a global batch, data-parallel rank ``r`` owns the contiguous slice
``[r * m * a, (r + 1) * m * a)`` (m = micro batch, a = accumulation steps) and takes its
micro-batches from it in order. So the set of samples a rank sees per optimizer step does not
depend on how it is split into micro-batches (micro 1 x accumulation 8 sees what 8 x 1 sees).

``consumed_samples`` counts samples over all ranks. Every micro-batch step consumes
``m * data_parallel_size`` of them; a sampler created (or loaded) with the count of a checkpoint
yields exactly the micro-batches an uninterrupted run would have yielded next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["DataParallelSampler"]


class DataParallelSampler:
    """Yields this rank's micro-batches of dataset indices, one epoch per iteration.

    Usable as a ``torch.utils.data.DataLoader`` ``batch_sampler``. Iterating yields the remaining
    micro-batches of the current epoch and advances :attr:`consumed_samples` by
    ``micro_batch_size * data_parallel_size`` per micro-batch as it is handed out; the next
    iteration continues with the next epoch.

    Note: a DataLoader with workers prefetches batches, so the sampler's own count runs ahead of
    the training loop. Save the trainer's count of samples actually trained on and restore it
    with :meth:`load_state_dict` or the ``consumed_samples`` argument.

    Args:
        num_samples: Dataset size.
        micro_batch_size: Samples per micro-batch per rank.
        data_parallel_rank: This rank.
        data_parallel_size: Number of data-parallel ranks.
        accumulation_steps: Micro-batches per optimizer step.
        seed: Seed of the epoch permutations.
        shuffle: Permute samples every epoch (False: dataset order every epoch).
        consumed_samples: Samples (over all ranks) already consumed.

    Raises:
        ValueError: For invalid sizes, a dataset smaller than one global batch, or a
            ``consumed_samples`` that is not a whole number of micro-batch steps.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        accumulation_steps: int = 1,
        seed: int = 1234,
        shuffle: bool = True,
        consumed_samples: int = 0,
    ) -> None:
        if micro_batch_size < 1 or accumulation_steps < 1 or data_parallel_size < 1:
            raise ValueError(
                "micro_batch_size, accumulation_steps and data_parallel_size must be >= 1"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})"
            )
        self.num_samples = int(num_samples)
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.accumulation_steps = accumulation_steps
        self.seed = int(seed)
        self.shuffle = shuffle
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                f"{self.global_batch_size} (micro {micro_batch_size} x accumulation "
                f"{accumulation_steps} x data-parallel {data_parallel_size})"
            )
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)
        self.consumed_samples = 0
        self.set_consumed_samples(consumed_samples)

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.micro_batch_size * self.accumulation_steps * self.data_parallel_size

    @property
    def samples_per_micro_step(self) -> int:
        """Samples consumed over all ranks by one micro-batch step."""
        return self.micro_batch_size * self.data_parallel_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        return self.num_samples // self.global_batch_size

    @property
    def samples_per_epoch(self) -> int:
        """Samples consumed per epoch (the remainder is dropped)."""
        return self.steps_per_epoch * self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next micro-batch belongs to."""
        return self.consumed_samples // self.samples_per_epoch

    def set_consumed_samples(self, consumed_samples: int) -> None:
        """Moves the sampler to a position (a whole number of micro-batch steps)."""
        if consumed_samples < 0 or consumed_samples % self.samples_per_micro_step:
            raise ValueError(
                f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size x "
                f"data_parallel_size = {self.samples_per_micro_step}"
            )
        self.consumed_samples = int(consumed_samples)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm = rng.permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def micro_batch(self, consumed_samples: int) -> list[int]:
        """This rank's micro-batch at a given position (pure: does not move the sampler)."""
        epoch, within = divmod(consumed_samples, self.samples_per_epoch)
        step, in_step = divmod(within, self.global_batch_size)
        micro = in_step // self.samples_per_micro_step
        m, a = self.micro_batch_size, self.accumulation_steps
        start = step * self.global_batch_size + self.data_parallel_rank * m * a + micro * m
        return self._order(epoch)[start : start + m].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch_end = (self.epoch + 1) * self.samples_per_epoch
        while self.consumed_samples < epoch_end:
            batch = self.micro_batch(self.consumed_samples)
            self.consumed_samples += self.samples_per_micro_step
            yield batch

    def __len__(self) -> int:
        """Micro-batches left in the current epoch for this rank."""
        left = (self.epoch + 1) * self.samples_per_epoch - self.consumed_samples
        return left // self.samples_per_micro_step

    def state_dict(self) -> dict[str, Any]:
        """The position and the settings that must match on resume."""
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position.

        The data-parallel size and micro-batch split may differ from the saved run as long as
        the global batch size is the same and the position is a micro-batch step boundary.

        Raises:
            ValueError: When seed, shuffling, dataset size or global batch size differ.
        """
        current = self.state_dict()
        for key in ("seed", "shuffle", "num_samples", "global_batch_size"):
            if state[key] != current[key]:
                raise ValueError(
                    f"cannot resume: saved {key}={state[key]!r} but this sampler has "
                    f"{key}={current[key]!r}"
                )
        self.set_consumed_samples(int(state["consumed_samples"]))
