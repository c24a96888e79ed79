"""The SPIN run: iterations of (generate with the opponent, train on real vs generated, refresh).

`train_spin` is the entry point the ``align`` CLI calls for ``align run spin`` (the SPIN
counterpart of `align_core.trainer.train`). Per iteration ``t`` of ``trainer.max_iterations``:

1. at the iteration's first step the opponent π_t is set to the policy's current weights: the
   opponent is a refreshable reference strategy (`align_core.reference.refreshable_reference`,
   ``swap`` or ``model``) and ``refresh()`` copies the policy into it;
2. π_t answers every training prompt (`align_core.generation.rollout.rollout`: sharded over
   data parallelism, chunks of ``rollout_micro_batch_size``, a seed per example and iteration),
   with the optimizer state offloaded to host memory on GPU
   (`align_core.generation.offload`); the answers are written to
   ``run_dir/generations/iter_<t>.jsonl`` — or read from it when it is already complete, so a
   resumed run never generates them again;
3. the policy is trained for ``trainer.max_epochs`` epochs on the pairs (real answer, π_t's
   answer) of iteration ``t`` (and ``t − 1`` with ``train_on_previous_iteration``) with
   `align_core.algorithms.spin.SPINStep` at β_t, π_t being the reference; the shared
   `align_core.trainer.loop.Trainer` runs the steps, validation and saves of the iteration;
4. the trained policy becomes π_{t+1}.

Steps and samples are counted over the whole run; iteration ``t`` covers the global steps
``[start_t, start_t + steps_t)`` with ``steps_t = steps_per_epoch_t × max_epochs``
(`plan_iterations`), capped overall by ``trainer.max_steps``. Checkpoints carry the iteration
and the opponent's weights (an extra model of the checkpoint), so a run resumes mid-iteration
with the right opponent; at an iteration boundary the opponent is the policy itself. The final
checkpoint keeps the opponent too: raising ``trainer.max_iterations`` and resuming continues
with another iteration.

Metrics (train): ``loss``, ``acc``, ``rewards_actual_mean``, ``rewards_generated_mean``,
``rewards_margin``, ``generated_length_mean``, ``iteration``, ``kl_penalty``,
``generation_tokens_per_s`` (of the iteration's rollout) and the trainer's own (``grad_norm``,
``lr``, ``consumed_samples``, ``epoch`` within the iteration, ...). Validation: ``loss`` (SFT NLL
per token of the held-out answers) and ``generated_length_mean`` of ``spin.val_generations``
held-out prompts answered greedily by the current policy, written to
``run_dir/generations/val_step_<step>.jsonl``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from align_core.algorithms.spin import SPINConfig
from align_core.config import ModelConfig, ParallelConfig
from align_core.optim import OptimizerConfig, SchedulerConfig
from align_core.trainer.config import ReferenceConfig, TrainerConfig
from align_core.trainer.loop import StepPlan, plan_steps
from align_core.trainer.metrics import MetricsSink
from align_core.trainer.run import DataConfig, RunResult

__all__ = [
    "IterationPlan",
    "OpponentStrategy",
    "SPINRunConfig",
    "SPINTrainerConfig",
    "plan_iterations",
    "resolve_opponent_strategy",
    "spin_steps",
    "train_spin",
    "trainer_config",
]

OpponentStrategy = Literal["swap", "model"]
"""The reference strategies that can hold SPIN's opponent (it changes every iteration)."""


@dataclass
class SPINTrainerConfig(TrainerConfig):
    """``trainer.spin``: the trainer's settings, ``max_epochs`` per iteration, plus iterations.

    ``max_steps`` (when ≥ 0) caps the whole run; ``val_check_interval`` and ``save_interval``
    count steps within an iteration (every iteration also validates and saves at its end).

    Attributes:
        max_iterations: SPIN iterations (each: generate, then ``max_epochs`` epochs).
    """

    max_iterations: int = 3

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.max_iterations < 0:
            raise ValueError("trainer.spin.max_iterations must be >= 0")


@dataclass
class SPINRunConfig:
    """Everything one SPIN run needs (the SPIN counterpart of `RunConfig`).

    Attributes:
        run_dir: Checkpoints, ``generations/``, the exported ``final.nemo``.
        model: Architecture; None takes it from ``restore_from_path`` (or the tiny default).
        parallel: Tensor/pipeline layout (data parallel is the rest of the world).
        trainer: Loop settings per iteration, and ``max_iterations``.
        reference: The opponent's strategy: ``swap`` (default for ``auto``) or ``model``.
        data: SFT files (prompt/completion, messages, NeMo input/output or conversations) and
            batch sizes (``global_batch_size`` counts pairs). Packing is not supported.
        spin: SPIN settings (β, rollout and sampling settings, ...).
        optim: Optimizer settings.
        sched: Learning-rate schedule over the steps of all iterations.
        restore_from_path: The SFT ``.nemo`` to start from; None builds a fresh model with the
            byte tokenizer (tests and demos).
        resume: Continue from the newest checkpoint in ``run_dir`` when there is one.
        export_nemo: Write the final policy to ``run_dir/final.nemo`` when the run completes;
            None: unless the model was restored from a Hugging Face directory.
        export_hf: Write the final policy to ``run_dir/final_hf/`` when the run completes;
            None: when the model was restored from a Hugging Face directory.
        seed: Seed of initialisation and of the generation seeds.
    """

    run_dir: str
    model: ModelConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: SPINTrainerConfig = field(default_factory=SPINTrainerConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    spin: SPINConfig = field(default_factory=SPINConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    restore_from_path: str | None = None
    resume: bool = True
    export_nemo: bool | None = None
    export_hf: bool | None = None
    seed: int = 1234


@dataclass(frozen=True)
class IterationPlan:
    """The global steps of one iteration.

    Attributes:
        iteration: 0-based iteration.
        pairs: Training pairs (prompts, or twice that with ``train_on_previous_iteration``).
        start_step: Global steps done before it.
        steps: Its steps (``steps_per_epoch × max_epochs``, or fewer under ``max_steps``).
        steps_per_epoch: Global batches per epoch of its pairs.
        val_check_interval: Validate every this many of its steps (0: never).
    """

    iteration: int
    pairs: int
    start_step: int
    steps: int
    steps_per_epoch: int
    val_check_interval: int

    @property
    def end_step(self) -> int:
        """Global step count when the iteration is done."""
        return self.start_step + self.steps


def trainer_config(cfg: TrainerConfig, **changes: Any) -> TrainerConfig:
    """A plain `TrainerConfig` with ``cfg``'s values (a `SPINTrainerConfig` too) and changes."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainerConfig)}
    return TrainerConfig(**{**base, **changes})


def plan_iterations(
    cfg: SPINTrainerConfig,
    *,
    prompts: int,
    global_batch_size: int,
    val_batches: int,
    train_on_previous_iteration: bool,
) -> list[IterationPlan]:
    """Where each iteration starts and how many steps it has (NeMo-Aligner's accounting).

    Raises:
        ValueError: Fewer pairs than one global batch.
    """
    plans: list[IterationPlan] = []
    start = 0
    for t in range(cfg.max_iterations):
        pairs = prompts * (2 if train_on_previous_iteration and t > 0 else 1)
        sp = plan_steps(
            trainer_config(cfg, max_steps=-1),
            train_samples=pairs,
            global_batch_size=global_batch_size,
            val_batches=val_batches,
        )
        steps = sp.max_steps if cfg.max_steps < 0 else min(sp.max_steps, cfg.max_steps - start)
        if steps <= 0:
            break
        plans.append(
            IterationPlan(t, pairs, start, steps, sp.steps_per_epoch, sp.val_check_interval)
        )
        start += steps
    return plans


def spin_steps(
    cfg: SPINTrainerConfig,
    *,
    prompts: int,
    global_batch_size: int,
    val_batches: int,
    train_on_previous_iteration: bool,
) -> tuple[list[IterationPlan], StepPlan]:
    """The iterations (`plan_iterations`) and the run's step accounting over all of them.

    The `StepPlan` has one iteration's epoch length and validation/save intervals (as the
    first iteration counts them) and ``max_steps`` over every iteration: what the run plan
    reports, the learning-rate schedule spans and the dry run prints.

    Raises:
        ValueError: See `plan_iterations`.
    """
    iterations = plan_iterations(
        cfg,
        prompts=prompts,
        global_batch_size=global_batch_size,
        val_batches=val_batches,
        train_on_previous_iteration=train_on_previous_iteration,
    )
    steps = plan_steps(
        trainer_config(cfg, max_steps=-1),
        train_samples=prompts,
        global_batch_size=global_batch_size,
        val_batches=val_batches,
    )
    total = iterations[-1].end_step if iterations else 0
    return iterations, dataclasses.replace(steps, max_steps=total)


def resolve_opponent_strategy(config: ReferenceConfig) -> OpponentStrategy:
    """``model.reference.strategy`` for SPIN: ``auto`` is ``swap`` (NeMo-Aligner's choice).

    Raises:
        ValueError: ``adapters`` or ``precompute``, which cannot hold an opponent that changes
            every iteration.
    """
    if config.strategy in ("auto", "swap"):
        return "swap"
    if config.strategy == "model":
        return "model"
    raise ValueError(
        f"model.reference.strategy={config.strategy} cannot be SPIN's opponent, which becomes "
        "the trained policy after every iteration; use swap (host memory) or model (a second "
        "model in device memory)"
    )


def train_spin(run: SPINRunConfig, sinks: Sequence[MetricsSink] = ()) -> RunResult:
    """Train one SPIN run on this process's share of the world (call it on every rank).

    Initialises torch.distributed and megatron's groups from the launcher's environment,
    restores the SFT policy (or builds a fresh one), tokenizes the SFT data, resumes from
    ``run_dir`` when asked and possible, and runs the iterations (see the module docstring)
    until ``max_iterations``, ``max_steps``, the wall-clock limit or SIGTERM; then exports
    ``run_dir/final.nemo`` when the run completed and ``export_nemo`` is set. Metrics go to
    ``sinks`` on global rank 0 only (``start`` once with a `RunPlan` whose ``algorithm`` is
    ``"spin"``, ``finish`` however the run ends).

    Args:
        run: The run configuration.
        sinks: Metric receivers (rank 0 only).

    Returns:
        How the run ended (on every rank); ``steps`` and ``consumed_samples`` count all
        iterations; ``reference_strategy`` is the opponent's strategy.

    Raises:
        align_core.trainer.loop.NonFiniteError: A NaN/inf loss or gradient with
            ``trainer.nonfinite="stop"``.
        align_data.DataError: A malformed record (strict mode), before any training.
        ValueError: An inconsistent configuration, before any training; generations files
            written with other settings.
    """
    from align_core.trainer.spin_session import run_spin

    return run_spin(run, sinks)
