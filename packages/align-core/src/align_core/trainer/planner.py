"""One planner for training and ``--dry-run``: the layout, the batch arithmetic and the steps.

`plan_layout` derives the data-parallel size and the gradient accumulation from the world size,
the parallel layout and the batch sizes (the only place they are derived); `plan_run` adds the
step accounting (`align_core.trainer.loop.plan_steps`) and returns the `RunPlan` the sinks
receive. Both are pure: the CLI's dry run calls them with its data counts and cannot disagree
with the run that follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from align_core.config import ParallelConfig
from align_core.trainer.config import TrainerConfig
from align_core.trainer.loop import StepPlan, plan_steps
from align_core.trainer.run import RunPlan

__all__ = [
    "BatchLayout",
    "PlannedRun",
    "data_parallel_size",
    "multiple_hint",
    "plan_layout",
    "plan_run",
]


class _BatchSizes(Protocol):
    micro_batch_size: int
    global_batch_size: int


class PlannedRun(Protocol):
    """What the planner reads from a run configuration (every algorithm's config has it).

    Read-only, so a subclass's section (SPIN's ``SPINTrainerConfig``) satisfies it.
    """

    @property
    def run_dir(self) -> str:
        """The run directory."""
        ...

    @property
    def parallel(self) -> ParallelConfig:
        """The tensor/pipeline layout."""
        ...

    @property
    def trainer(self) -> TrainerConfig:
        """The loop settings."""
        ...

    @property
    def data(self) -> Any:
        """Batch sizes and data settings (`align_core.trainer.DataConfig`)."""
        ...


@dataclass(frozen=True)
class BatchLayout:
    """How the processes and the global batch divide.

    Attributes:
        world_size: Processes.
        data_parallel_size: Data-parallel replicas (``world / (TP × PP × CP)``).
        micro_batch_size: Examples per micro-batch per replica.
        global_batch_size: Examples per optimizer step.
        accumulation_steps: Micro-batches per replica per step.
    """

    world_size: int
    data_parallel_size: int
    micro_batch_size: int
    global_batch_size: int
    accumulation_steps: int


def multiple_hint(global_batch_size: int, per_step: int) -> str:
    """``use model.global_batch_size=A or B``: the multiples of ``per_step`` nearest to it."""
    lower = global_batch_size // per_step * per_step
    use = f"{lower} or {lower + per_step}" if lower else str(per_step)
    return f"use model.global_batch_size={use}"


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """Data-parallel replicas on ``world_size`` processes (``world / (TP × PP × CP)``).

    Raises:
        ValueError: The processes cannot hold TP × PP × CP.
    """
    model_parallel = (
        parallel.tensor_model_parallel_size
        * parallel.pipeline_model_parallel_size
        * parallel.context_parallel_size
    )
    if world_size % model_parallel:
        raise ValueError(
            f"{world_size} processes cannot hold TP × PP × CP = {model_parallel} "
            "(set --nproc-per-node/--nnodes or the model.*_parallel_size keys)"
        )
    return world_size // model_parallel


def plan_layout(parallel: ParallelConfig, data: _BatchSizes, world_size: int) -> BatchLayout:
    """Data-parallel size and accumulation of a run on ``world_size`` processes.

    Raises:
        ValueError: The processes cannot hold TP × PP × CP, or the global batch is not a
            multiple of micro batch × data-parallel size (naming the nearest values that are).
    """
    dp = data_parallel_size(parallel, world_size)
    micro, gbs = data.micro_batch_size, data.global_batch_size
    per_step = micro * dp
    if gbs % per_step:
        raise ValueError(
            f"model.global_batch_size {gbs} is not a multiple of model.micro_batch_size × "
            f"data-parallel size = {micro} × {dp}; {multiple_hint(gbs, per_step)}"
        )
    return BatchLayout(world_size, dp, micro, gbs, gbs // per_step)


def plan_run(
    run: PlannedRun,
    world_size: int,
    *,
    algorithm: str,
    train_samples: int,
    val_samples: int,
    reference_strategy: str,
    steps: StepPlan | None = None,
) -> RunPlan:
    """The plan of a run that has not started (``start_step`` 0, not resumed).

    Args:
        run: The run configuration (layout, trainer settings, batch sizes).
        world_size: Processes.
        algorithm: The ``align run`` command (``RunPlan.algorithm``).
        train_samples: Training examples after validation and filtering.
        val_samples: Held-out examples available.
        reference_strategy: The resolved reference strategy (``none`` without one).
        steps: The step accounting when the algorithm plans its own (SPIN's iterations);
            None: `plan_steps` over ``train_samples``.

    Raises:
        ValueError: See `plan_layout`, and `plan_steps` (too few examples for one step).
    """
    layout = plan_layout(run.parallel, run.data, world_size)
    gbs = layout.global_batch_size
    if steps is None:
        steps = plan_steps(
            run.trainer,
            train_samples=train_samples,
            global_batch_size=gbs,
            val_batches=val_samples // gbs,
        )
    return RunPlan(
        algorithm=algorithm,
        run_dir=str(run.run_dir),
        world_size=world_size,
        tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.parallel.pipeline_model_parallel_size,
        data_parallel_size=layout.data_parallel_size,
        micro_batch_size=layout.micro_batch_size,
        global_batch_size=gbs,
        accumulation_steps=layout.accumulation_steps,
        train_samples=train_samples,
        val_samples=steps.val_batches * gbs,
        steps_per_epoch=steps.steps_per_epoch,
        max_steps=steps.max_steps,
        start_step=0,
        val_check_interval=steps.val_check_interval,
        save_interval=steps.save_interval,
        reference_strategy=reference_strategy,
        resumed_from=None,
    )
