"""One training run end to end: `run_session` assembles any algorithm's `Recipe`.

Every run — the DPO family, KTO and SFT (`run_training`, which `align_core.trainer.train`
delegates to), distillation (align-kd) and SPIN (`align_core.trainer.spin_session`) — goes
through `run_session`: the plan (`align_core.trainer.planner.plan_run`), the data, the
reference, megatron DDP and optimizer, checkpoints, resume, the sinks, fit and the final export.
An algorithm brings a `Recipe`: its step, forward, examples, what a resume must match, and
optional hooks (a batch source wrapping the data, a reference built once the steps are planned,
work before the export, and an outer loop of `Stage` objects — SPIN's iterations — each run by
its own `Trainer` on the run's step scale).

Order matters for the reference policy: the policy is built with its initial weights, the
reference is captured from them (snapshot, second model, or the precompute pass), and only then
is a checkpoint loaded on resume, so π_ref is always the initial policy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from align_core.algorithms._packed import packed_forward
from align_core.algorithms.contract import AlgorithmStep, ModelBatch
from align_core.algorithms.registry import REGISTRY, get_algorithm
from align_core.optim import OptimizerConfig, SchedulerConfig
from align_core.reference import (
    AdapterReference,
    ModelReference,
    ReferencePolicy,
    SwapReference,
    model_fingerprint,
    precompute_reference,
    resolve_strategy,
)
from align_core.schedule import ForwardFn
from align_core.trainer.build import (
    ModelSource,
    build_algorithm,
    build_policy,
    load_datasets,
    needs_reference,
    on_main_then_all,
    reference_merge,
    resolve_model_source,
)
from align_core.trainer.config import TrainerConfig
from align_core.trainer.data import TrainData
from align_core.trainer.finish import (
    FinalExports,
    Fit,
    export_final,
    final_formats,
    fit_and_finish,
)
from align_core.trainer.loop import (
    BatchSource,
    ParallelGroups,
    StepPlan,
    Trainer,
    TrainerState,
    resume_length_note,
    stop_flags,
)
from align_core.trainer.metrics import MetricsSink, announce, shows_status
from align_core.trainer.planner import PlannedRun, plan_run
from align_core.trainer.run import RunConfig, RunResult
from align_core.trainer.signals import StopRequest, parse_max_time
from align_data import CollateConfig

__all__ = [
    "Recipe",
    "ReferenceHook",
    "Session",
    "SessionConfig",
    "Stage",
    "StageLoop",
    "check_run_config",
    "run_session",
    "run_training",
]


class SessionConfig(PlannedRun, Protocol):
    """What `run_session` reads from a run configuration (read-only).

    `RunConfig`, ``KDRunConfig`` and ``SPINRunConfig`` satisfy it.
    """

    @property
    def optim(self) -> OptimizerConfig:
        """Optimizer settings."""
        ...

    @property
    def sched(self) -> SchedulerConfig:
        """Learning-rate schedule."""
        ...

    @property
    def resume(self) -> bool:
        """Continue from the newest checkpoint when there is one."""
        ...

    @property
    def export_nemo(self) -> bool | None:
        """Write ``final.nemo`` at the end (None: the source's format decides)."""
        ...

    @property
    def export_hf(self) -> bool | None:
        """Write ``final_hf/`` at the end (None: the source's format decides)."""
        ...


def _pack_capacity(run: RunConfig, seq_length: int) -> int | None:
    if not run.data.packing:
        return None
    spec = get_algorithm(run.algorithm)
    if spec.pack_factor is None:
        packable = [
            s.name for s in REGISTRY.values() if s.shared_loop and not s.is_preset and s.pack_factor
        ]
        raise ValueError(
            f"model.data.packing is supported for {' and '.join(packable)}, not {run.algorithm}"
        )
    if run.data.pack_size is not None:
        return run.data.pack_size
    return spec.pack_factor * seq_length


def _build_reference(
    run: RunConfig,
    strategy: str,
    policy: Any,
    source: ModelSource,
    forward_fn: ForwardFn,
    data_fingerprint: str,
    data: TrainData,
    plan: StepPlan,
    groups: ParallelGroups,
    sinks: Sequence[MetricsSink] = (),
) -> ReferencePolicy:
    from megatron.core import parallel_state as ps

    merge = reference_merge(run, data.accumulation_steps)
    if strategy == "swap":
        return SwapReference(policy, forward_fn, merge=merge)
    if strategy == "model":
        reference = build_policy(source, run.parallel)
        # The base weights (LoRA adapters, zero-initialised, are not part of the reference).
        base = {k: v for k, v in policy.state_dict().items() if "_lora." not in k}
        reference.load_state_dict(base)
        return ModelReference(reference, forward_fn, merge=merge, policy=policy)
    if strategy == "adapters":
        from align_core.lora import lora_disabled

        return AdapterReference(policy, forward_fn, lora_disabled, merge=merge)
    # precompute: one pass over exactly the batches the run will train and validate on.
    key = {
        "version": 1,
        "reference": model_fingerprint(policy, group=groups.world),
        "data": data_fingerprint,
        "algorithm": run.algorithm,
        "layout": [
            dist.get_world_size(),
            run.parallel.tensor_model_parallel_size,
            run.parallel.pipeline_model_parallel_size,
        ],
        "batching": [data.micro_batch_size, data.global_batch_size, data.seed, data.shuffle],
        "packing": data.pack_capacity,
        "merge": merge,
        "vocab_size": source.tokenizer.vocab_size,
    }

    def train_epochs() -> Iterator[Iterator[list[ModelBatch]]]:
        g, spe = data.global_batch_size, plan.steps_per_epoch
        for start in range(0, plan.max_steps, spe):
            steps = range(start, min(start + spe, plan.max_steps))
            yield (data.train_micro_batches(s * g) for s in steps)

    def val_epochs() -> Iterator[Iterator[list[ModelBatch]]]:
        yield (data.val_micro_batches(i) for i in range(plan.val_batches))

    epochs = -(-plan.max_steps // plan.steps_per_epoch)
    rows = len(data.train) * (epochs if data.per_epoch_cache_rows else 1)
    splits: dict[str, tuple[int, Callable[[], Iterator[Iterator[list[ModelBatch]]]]]] = {
        "train": (rows, train_epochs)
    }
    if plan.val_batches and plan.val_check_interval:
        splits["val"] = (max(len(data.val), 1), val_epochs)
    root = run.reference.cache_dir or str(Path(run.run_dir) / "reference_cache")
    writer = groups.is_last_stage and ps.get_tensor_model_parallel_rank() == 0
    return precompute_reference(
        policy,
        forward_fn,
        root=root,
        key=key,
        splits=splits,
        writer=writer,
        merge=merge,
        progress=shows_status(sinks),
        status=lambda text: announce(sinks, text),
        steps={"train": plan.max_steps, "val": plan.val_batches},
    )


@dataclass
class Stage:
    """One `Trainer`'s share of a run: the whole run, or one of SPIN's iterations.

    Attributes:
        step: The algorithm step the stage trains with.
        train: Its training examples.
        seed: Seed of its data order.
        start_step: Run steps done before it (the trainer's ``step_offset``).
        steps_per_epoch: Global batches per epoch of ``train`` (None: the run plan's).
        trainer: Its loop settings; None: the run's ``trainer`` section.
        reference: Its reference policy; None: the recipe's (if any).
        metric_fields: Added to every metrics dict it reports (SPIN: ``iteration``).
        trainer_state: Added to the trainer state of each checkpoint it saves.
        extra_state: Added to the extra state of each checkpoint it saves.
    """

    step: AlgorithmStep
    train: Sequence[Any]
    seed: int
    start_step: int = 0
    steps_per_epoch: int | None = None
    trainer: TrainerConfig | None = None
    reference: ReferencePolicy | None = None
    metric_fields: Mapping[str, float] = dataclasses.field(default_factory=dict)
    trainer_state: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra_state: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Session:
    """What a recipe's ``stages`` loop works with: the assembled, resumed run.

    Attributes:
        model: The DDP-wrapped policy.
        optimizer: Megatron's optimizer (a rollout may offload its state).
        groups: The run's process groups.
        resumed_step: The run step of the checkpoint resumed from (None: a fresh run).
        stop_reason: Set by `should_stop` once the ranks agreed to stop.
    """

    def __init__(
        self, model: Any, optimizer: Any, groups: ParallelGroups, stop: StopRequest
    ) -> None:
        """Hold the pieces; ``resumed_step`` is set once a checkpoint is loaded."""
        self.model = model
        self.optimizer = optimizer
        self.groups = groups
        self.stop = stop
        self.resumed_step: int | None = None
        self.stop_reason: str | None = None

    def should_stop(self) -> bool:
        """Whether SIGTERM/SIGINT or the time limit asks the run to stop (collective)."""
        signalled, time_up = stop_flags(self.stop, self.groups)
        if signalled or time_up:
            self.stop_reason = self.stop.stop_reason(signalled)
        return self.stop_reason is not None


StageLoop = Callable[[Session], Iterator[Stage]]
"""``session -> stages``: an outer loop yielding one `Stage` at a time (SPIN's iterations).

It starts at the stage holding ``session.resumed_step``, may do work between stages
(generation), and ends early, after `Session.should_stop`, when the run is asked to stop.
"""


@dataclass
class Recipe:
    """What one algorithm brings to a run; `run_session` assembles everything else.

    Attributes:
        algorithm: The ``align run`` command (the plan's and the sinks' name).
        source: Where the initial policy came from (architecture, tokenizer, export).
        policy: This rank's model chunk with its initial weights (LoRA added, if any).
        step: The algorithm step the loop runs (None with ``stages``: each brings its own).
        train: Tokenized training examples.
        val: Tokenized validation examples (may be empty).
        forward_fn: Per-micro-batch forward (token log-probs, or logits for distillation).
        collate: align-data collate settings.
        data_state: What a resumed run must share with the checkpoint (data fingerprint,
            batch size, seed, ...); a mismatch refuses the resume.
        resume_needs: The refusal's explanation.
        pack_capacity: Pack examples into rows of this many positions (None: padded rows).
        per_epoch_cache_rows: Reference cache rows per epoch (KTO) instead of per example.
        batch_source: Wraps the run's `TrainData` into the loop's batch source (an online
            teacher adding its top-k); None: the `TrainData` itself.
        reference: Builds the reference policy once the data and the steps are planned:
            ``(data, steps, groups, sinks) -> ReferencePolicy``; None: no reference.
        reference_strategy: The resolved strategy (``none`` without a reference).
        reference_update: ``(alpha, interval)``: refresh the reference toward the policy every
            ``interval`` steps (TR-DPO, `align_core.reference` ``refresh``); its weights are
            then saved with each checkpoint. None: the reference stays the initial policy.
        before_export: Runs before the final export (merging LoRA into the weights).
        stages: An outer loop of stages, one `Trainer` each (SPIN's iterations); None: one
            stage over ``train``.
        steps: The run's step accounting when ``stages`` plans its own; None: `plan_run`'s.
        extra_models: Further models saved and loaded with each checkpoint (SPIN's opponent).
        on_validate: ``run_step -> metrics`` added to each validation (SPIN's generations).
    """

    algorithm: str
    source: ModelSource
    policy: Any
    step: AlgorithmStep | None
    train: Sequence[Any]
    val: Sequence[Any]
    forward_fn: ForwardFn
    collate: CollateConfig
    data_state: Mapping[str, Any]
    resume_needs: str = "resume needs the same data and global batch size"
    pack_capacity: int | None = None
    per_epoch_cache_rows: bool = False
    batch_source: Callable[[TrainData], BatchSource] | None = None
    reference: ReferenceHook | None = None
    reference_strategy: str = "none"
    reference_update: tuple[float, int] | None = None
    before_export: Callable[[], None] | None = None
    stages: StageLoop | None = None
    steps: StepPlan | None = None
    extra_models: Callable[[], dict[str, Any]] | None = None
    on_validate: Callable[[int], Mapping[str, float]] | None = None


ReferenceHook = Callable[
    [TrainData, StepPlan, ParallelGroups, Sequence[MetricsSink]], ReferencePolicy
]
"""``(data, steps, groups, sinks) -> reference``: see `Recipe.reference`."""


class _Stages:
    """A recipe's stages run one `Trainer` after another; `fit_and_finish` reads it as one.

    Counters and the last metrics carry over from stage to stage (and from the checkpoint
    resumed from); a stage starting where the last checkpoint was written does not write it
    again.
    """

    def __init__(
        self,
        loop: Iterator[Stage],
        trainer_for: Callable[[Stage], Trainer],
        session: Session,
        resumed: Mapping[str, Any] | None,
        checkpoint: str | None,
    ) -> None:
        self.loop = loop
        self.trainer_for = trainer_for
        self.session = session
        self.resumed = resumed
        self.run_step = int(resumed["step"]) if resumed else 0
        self.run_samples = int(resumed["consumed_samples"]) if resumed else 0
        self.skipped_steps = int(resumed.get("skipped_steps", 0)) if resumed else 0
        self.last_train_metrics: dict[str, float] = {}
        self.last_val_metrics: dict[str, float] = {}
        self.last_checkpoint = checkpoint

    def fit(self) -> str:
        """Run the stages in turn; the stop reason of the last (``completed`` when all ran).

        SIGTERM/SIGINT are caught for the whole loop, the work between stages included.
        """
        self.session.stop.install()
        try:
            for stage in self.loop:
                trainer = self.trainer_for(stage)
                resumed, self.resumed = self.resumed, None  # the first stage continues it
                if resumed is not None:
                    trainer.load_state_dict(resumed)
                else:
                    trainer.state = TrainerState(skipped_steps=self.skipped_steps)
                if self.last_checkpoint is not None and trainer.run_step == self.run_step:
                    trainer.mark_saved(self.last_checkpoint)
                try:
                    reason = trainer.fit()
                finally:
                    self._take(trainer)
                if reason != "completed":
                    return reason
            return self.session.stop_reason or "completed"
        finally:
            self.session.stop.restore()

    def _take(self, trainer: Trainer) -> None:
        self.run_step, self.run_samples = trainer.run_step, trainer.run_samples
        self.skipped_steps = trainer.state.skipped_steps
        self.last_train_metrics = trainer.last_train_metrics or self.last_train_metrics
        self.last_val_metrics = trainer.last_val_metrics or self.last_val_metrics
        self.last_checkpoint = trainer.last_checkpoint


def run_session(
    run: SessionConfig, recipe: Recipe, ctx: Any, sinks: Sequence[MetricsSink]
) -> RunResult:
    """Train ``recipe`` under ``run``'s settings.

    Plan, data, reference, DDP, optimizer, checkpoints, resume, sinks, fit and the final export.

    Args:
        run: The run configuration (run directory, layout, trainer, data, optimizer, schedule,
            resume and export settings).
        recipe: What the algorithm brings.
        ctx: The distributed context (`align_core.parallel.init_distributed`).
        sinks: Metric receivers (used on global rank 0 only).

    Returns:
        How the run ended (on every rank).
    """
    from align_core.checkpoint import Checkpointer, check_resume
    from align_core.optim import build_optimizer, learning_rate
    from align_core.training import wrap_ddp

    run_dir = Path(run.run_dir)
    sinks = list(sinks) if ctx.is_main else []
    groups = ParallelGroups.from_megatron(ctx.device)
    plan = plan_run(
        run,
        ctx.world_size,
        algorithm=recipe.algorithm,
        train_samples=len(recipe.train),
        val_samples=len(recipe.val),
        reference_strategy=recipe.reference_strategy,
        steps=recipe.steps,
    )
    steps = plan.steps

    def stage_data(stage: Stage) -> TrainData:
        return TrainData(
            stage.train,
            recipe.val,
            stage.step,
            recipe.collate,
            micro_batch_size=run.data.micro_batch_size,
            global_batch_size=run.data.global_batch_size,
            data_parallel_rank=ctx.data_rank,
            data_parallel_size=ctx.data_parallel_size,
            seed=stage.seed,
            shuffle=run.data.shuffle,
            per_epoch_cache_rows=recipe.per_epoch_cache_rows,
            uniform_length=run.parallel.pipeline_model_parallel_size > 1,
            pack_capacity=recipe.pack_capacity,
            epoch_batches=stage.steps_per_epoch or steps.steps_per_epoch,
        )

    def batch_source(data: TrainData) -> BatchSource:
        return data if recipe.batch_source is None else recipe.batch_source(data)

    single, source = None, None
    if recipe.stages is None:
        if recipe.step is None:
            raise ValueError(f"the {recipe.algorithm} recipe has neither a step nor stages")
        single = Stage(recipe.step, recipe.train, seed=run.data.seed)
        data = stage_data(single)
        source = batch_source(data)
        if recipe.reference is not None:
            single.reference = recipe.reference(data, steps, groups, sinks)
    on_step_end, updated_models = _reference_updates(
        single.reference if single else None, recipe.reference_update
    )

    def extra_models() -> dict[str, Any] | None:
        models = dict(updated_models() or {})
        if recipe.extra_models is not None:
            models.update(recipe.extra_models())
        return models or None

    model = wrap_ddp(recipe.policy)
    optimizer = build_optimizer(model, run.optim, clip_grad=run.trainer.gradient_clip_val)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", keep_last=run.trainer.keep_last_checkpoints
    )
    data_state = dict(recipe.data_state)
    # The architecture, for `align ckpt inspect` (plain values only: read back weights-only).
    model_summary = {
        k: v
        for k, v in dataclasses.asdict(recipe.source.model).items()
        if v is None or isinstance(v, (bool, int, float, str))
    }
    stop = StopRequest(parse_max_time(run.trainer.max_time))
    session = Session(model, optimizer, groups, stop)

    def trainer_for(stage: Stage, source: BatchSource | None = None) -> Trainer:
        def save(step: int, trainer_state: dict[str, Any]) -> str:
            path = checkpointer.save(
                step,
                model,
                optimizer,
                trainer_state={**trainer_state, **stage.trainer_state},
                extra_state={
                    "data": data_state,
                    "plan": {"max_steps": steps.max_steps},
                    "model": model_summary,
                    **stage.extra_state,
                },
                extra_models=extra_models(),
            )
            return str(path)

        return Trainer(
            config=stage.trainer or run.trainer,
            algorithm=stage.step,
            model=model,
            optimizer=optimizer,
            data=source or batch_source(stage_data(stage)),
            forward_fn=recipe.forward_fn,
            learning_rate=lambda step: learning_rate(
                step, lr=run.optim.lr, schedule=run.sched, total_steps=steps.max_steps
            ),
            groups=groups,
            reference=stage.reference,
            save=save,
            sinks=sinks,
            stop=stop,
            step_offset=stage.start_step,
            metric_fields=stage.metric_fields,
            on_validate=recipe.on_validate,
            on_step_end=on_step_end,
        )

    trainer = trainer_for(single, source) if single is not None else None
    resumed: dict[str, Any] | None = None
    checkpoint: str | None = None
    if run.resume:
        loaded = checkpointer.load(model, optimizer, extra_models=extra_models())
        if loaded is not None:
            check_resume(
                loaded.extra_state.get("data", {}),
                data_state,
                loaded.path,
                needs=recipe.resume_needs,
            )
            resumed, checkpoint = dict(loaded.trainer_state), str(loaded.path)
            session.resumed_step = int(resumed["step"])
            note = None
            if trainer is not None:
                trainer.load_state_dict(resumed)
                trainer.mark_saved(checkpoint)
                note = resume_length_note(
                    loaded.extra_state.get("plan", {}).get("max_steps"),
                    run.trainer,
                    steps,
                    start_step=trainer.state.step,
                    prefix=f"trainer.{get_algorithm(recipe.algorithm).section}",
                )
            plan = dataclasses.replace(
                plan, start_step=session.resumed_step, resumed_from=checkpoint, resume_note=note
            )
    for sink in sinks:
        sink.start(plan)

    nemo, hf = final_formats(run.export_nemo, run.export_hf, recipe.source)

    def export() -> FinalExports:
        if recipe.before_export is not None:
            recipe.before_export()
        return export_final(model, run_dir, recipe.source, nemo=nemo, hf=hf)

    fit: Fit
    if trainer is not None:
        fit = trainer
    else:
        assert recipe.stages is not None
        fit = _Stages(recipe.stages(session), trainer_for, session, resumed, checkpoint)
    return fit_and_finish(
        fit,
        sinks,
        run_dir=run_dir,
        reference_strategy=recipe.reference_strategy,
        export=export if nemo or hf else None,
    )


def _reference_updates(
    reference: ReferencePolicy | None, update: tuple[float, int] | None
) -> tuple[Callable[[int], None] | None, Callable[[], dict[str, Any] | None]]:
    """The step-end hook refreshing ``reference`` and the checkpoint's extra models.

    Returns:
        ``(on_step_end, extra_models)``: the hook (None without updates) and a function giving
        the reference weights to save and load with each checkpoint (None without updates).
    """
    if reference is None or update is None:
        return None, lambda: None
    alpha, interval = update
    refreshable: Any = reference
    if not hasattr(refreshable, "checkpoint_state"):
        raise ValueError(
            f"the {reference.strategy} reference cannot be updated during training (TR-DPO): "
            "use model.reference.strategy=swap or model"
        )

    def on_step_end(step: int) -> None:
        if step % interval == 0:
            refreshable.refresh(alpha)

    return on_step_end, lambda: {"reference": refreshable.checkpoint_state()}


def run_training(run: RunConfig, sinks: Sequence[MetricsSink]) -> RunResult:
    """See `align_core.trainer.train`: the shared loop's recipe (DPO family, KTO, SFT)."""
    from align_core.logprobs import forward_token_logps
    from align_core.parallel import init_distributed

    check_run_config(run)
    ctx = init_distributed(run.parallel, seed=run.seed)
    _check_layout(run)
    run_dir = Path(run.run_dir)
    on_main_then_all(lambda: run_dir.mkdir(parents=True, exist_ok=True))
    sinks = list(sinks) if ctx.is_main else []
    groups = ParallelGroups.from_megatron(ctx.device)

    source = resolve_model_source(run)
    seq_length = run.data.seq_length or source.model.seq_length
    datasets = load_datasets(
        run, source.tokenizer, seq_length, status=lambda text: announce(sinks, text)
    )
    spec = get_algorithm(run.algorithm)
    policy = build_policy(source, run.parallel)
    lora = run.peft is not None
    if run.peft is not None:
        from align_core.lora import add_lora

        add_lora(policy, run.peft)
    forward_fn: ForwardFn = functools.partial(
        forward_token_logps, vocab_size=source.tokenizer.vocab_size
    )
    capacity = _pack_capacity(run, seq_length)
    if capacity is not None:
        forward_fn = packed_forward(forward_fn)

    strategy = "none"
    reference: ReferenceHook | None = None
    if needs_reference(run):
        strategy = resolve_strategy(
            run.reference.strategy, lora=lora, updated=run.reference.updated
        )
        reference = functools.partial(
            _build_reference, run, strategy, policy, source, forward_fn, datasets.fingerprint
        )

    def merge_lora() -> None:
        from align_core.lora import merge_lora

        merge_lora(policy)

    recipe = Recipe(
        algorithm=run.algorithm,
        source=source,
        policy=policy,
        step=build_algorithm(run, groups.data),
        train=datasets.train,
        val=datasets.val,
        forward_fn=forward_fn,
        collate=CollateConfig(
            pad_id=source.tokenizer.pad_id,
            pad_to_multiple_of=run.data.pad_to_multiple_of or 1,
            default_chosen_reward=run.data.default_chosen_reward,
            default_rejected_reward=run.data.default_rejected_reward,
        ),
        data_state={
            "train_samples": len(datasets.train),
            "global_batch_size": run.data.global_batch_size,
            "data": datasets.fingerprint,
            "seed": run.data.seed,
        },
        pack_capacity=capacity,
        per_epoch_cache_rows=spec.per_epoch_reference,
        reference=reference,
        reference_strategy=strategy,
        reference_update=(
            (run.reference.update_alpha, run.reference.update_interval)
            if run.reference.update_alpha is not None and reference is not None
            else None
        ),
        before_export=merge_lora if lora else None,
    )
    return run_session(run, recipe, ctx, sinks)


def check_run_config(run: RunConfig) -> None:
    """Errors that need no data or model, raised before anything is built.

    The CLI's pre-flight makes the same check before launching.

    Raises:
        ValueError: A micro-batch smaller than the algorithm's loss works with.
    """
    get_algorithm(run.algorithm).check_micro_batch_size(run.data.micro_batch_size)


def _check_layout(run: RunConfig) -> None:
    """Megatron's groups may predate this run (a second run in one process): they must match."""
    from megatron.core import parallel_state as ps

    have = (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
    )
    want = (run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size)
    if have != want:
        raise ValueError(
            f"megatron is already initialised with TP×PP = {have[0]}×{have[1]} in this process; "
            f"this run asks for {want[0]}×{want[1]} (call align_core.destroy_distributed first)"
        )
