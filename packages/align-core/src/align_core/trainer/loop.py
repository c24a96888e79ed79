"""The trainer loop: one class holding the run's counters, handed an algorithm step.

`Trainer.fit` runs optimizer steps until max steps (or epochs), the wall-clock limit or SIGTERM,
validating and saving on schedule. One step over a global batch of
``micro_batch_size × accumulation × data-parallel size`` examples:

1. zero the gradient buffers;
2. reference log-probs of this rank's micro-batches (when the algorithm needs them);
3. the micro-batches, reference log-probs included, move to the model's device
   (`align_core.device.to_device`: pinned, non-blocking copies on CUDA);
4. the global-batch normaliser (examples, or tokens for token-mean losses), on that device;
5. forward/backward over the micro-batches (`align_core.schedule.forward_backward`);
6. metric sums reduced over data parallel and sent from the last pipeline stage to every rank;
7. gradient norm; a NaN/inf loss or gradient stops the run naming the step
   (``nonfinite="stop"``) or skips the update and counts it (``"skip"``);
8. clipping and the optimizer update at the scheduled learning rate.

Step accounting follows NeMo-Aligner: ``steps_per_epoch = ⌊train_samples / global_batch⌋``
(times ``limit_train_batches``), ``max_steps = steps_per_epoch × max_epochs`` capped by
``trainer.max_steps`` when that is ≥ 0, ``epoch = step // steps_per_epoch``; a fractional
``val_check_interval`` is a fraction of an epoch. Validation and saving happen when the step is
a multiple of their interval, at the last step, and when the time limit is hit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from align_core.algorithms._common import sum_metrics
from align_core.algorithms.contract import AlgorithmStep, ModelBatch, StatefulStep
from align_core.device import module_device, to_device
from align_core.reference import ReferencePolicy
from align_core.schedule import ForwardFn, broadcast_from_last_stage, forward_backward
from align_core.trainer.config import TrainerConfig
from align_core.trainer.data import TrainData
from align_core.trainer.metrics import MetricsSink, Split, peak_memory_bytes
from align_core.trainer.signals import StopRequest

__all__ = [
    "BatchSource",
    "NonFiniteError",
    "ParallelGroups",
    "StepPlan",
    "Trainer",
    "TrainerState",
    "plan_steps",
    "resume_length_note",
    "stop_flags",
]


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient with ``trainer.nonfinite="stop"``.

    Attributes:
        step: The 1-based optimizer step whose loss or gradient was not finite.
    """

    def __init__(self, step: int, loss: float, grad_norm: float) -> None:
        self.step = step
        super().__init__(
            f"non-finite training step {step}: loss={loss}, grad_norm={grad_norm}; the update was "
            "not applied. Lower the learning rate, check the data of this step, or set "
            "trainer.nonfinite=skip to skip such steps"
        )


class BatchSource(Protocol):
    """The data side of the loop (this data-parallel rank's share of each global batch).

    The sizes are read-only: plain attributes or properties.
    """

    @property
    def train_samples(self) -> int:
        """Training examples per epoch."""
        ...

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step (all data-parallel ranks)."""
        ...

    @property
    def num_val_batches(self) -> int:
        """Validation global batches available."""
        ...

    def train_micro_batches(self, consumed_samples: int) -> list[ModelBatch]:
        """Micro-batches of the global batch that follows ``consumed_samples`` examples."""
        ...

    def val_micro_batches(self, index: int) -> list[ModelBatch]:
        """Micro-batches of validation global batch ``index``."""
        ...


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups the loop reduces over (passed explicitly, never looked up).

    Attributes:
        data: Data-parallel group (metric sums).
        pipeline: Pipeline group (metrics travel from its last stage).
        world: All ranks (stop flags).
        is_last_stage: Whether this rank holds the last pipeline stage.
        is_main: Global rank 0 (the one that talks to sinks).
        device: Device for collective buffers (CPU with gloo).
    """

    data: dist.ProcessGroup | None
    pipeline: dist.ProcessGroup | None
    world: dist.ProcessGroup | None
    is_last_stage: bool
    is_main: bool
    device: torch.device

    @classmethod
    def from_megatron(cls, device: torch.device) -> ParallelGroups:
        """The groups of megatron's ``parallel_state`` (initialised by `init_distributed`)."""
        from megatron.core import parallel_state as ps

        return cls(
            data=_process_group(ps.get_data_parallel_group()),
            pipeline=_process_group(ps.get_pipeline_model_parallel_group()),
            world=dist.group.WORLD,
            is_last_stage=ps.is_pipeline_last_stage(),
            is_main=dist.get_rank() == 0,
            device=device if dist.get_backend() == "nccl" else torch.device("cpu"),
        )


def _process_group(group: object) -> dist.ProcessGroup | None:
    """A megatron group accessor's answer as one process group (None: this rank is in none).

    Raises:
        TypeError: Several groups (layouts this trainer does not run).
    """
    if group is None or isinstance(group, dist.ProcessGroup):
        return group
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        return None
    raise TypeError(f"expected one process group, got {group!r}")


@dataclass(frozen=True)
class StepPlan:
    """Resolved step accounting.

    Attributes:
        steps_per_epoch: Optimizer steps per epoch.
        max_steps: Steps of the whole run.
        val_check_interval: Validate every N steps (0: never).
        val_batches: Validation global batches per validation.
        save_interval: Save every N steps (0: only at the end).
    """

    steps_per_epoch: int
    max_steps: int
    val_check_interval: int
    val_batches: int
    save_interval: int


def plan_steps(
    config: TrainerConfig, *, train_samples: int, global_batch_size: int, val_batches: int
) -> StepPlan:
    """NeMo-Aligner's step accounting (see the module docstring).

    Raises:
        ValueError: Fewer training examples than one global batch, or a
            ``limit_train_batches`` that leaves no step per epoch.
    """
    full = train_samples // global_batch_size
    if full == 0:
        raise ValueError(
            f"{train_samples} training examples do not fill one global batch of "
            f"{global_batch_size} (model.global_batch_size)"
        )
    steps_per_epoch = _limit(config.limit_train_batches, full)
    if steps_per_epoch == 0:
        raise ValueError(
            f"trainer.limit_train_batches {config.limit_train_batches} leaves no step of the "
            f"{full} global batches per epoch"
        )
    max_steps = steps_per_epoch * config.max_epochs
    if config.max_steps >= 0:
        max_steps = min(max_steps, config.max_steps)
    n_val = _limit(config.limit_val_batches, val_batches)
    interval = config.val_check_interval
    if isinstance(interval, float) and 0 < interval <= 1:
        interval = max(1, int(interval * steps_per_epoch))
    interval = int(interval) if n_val > 0 else 0
    return StepPlan(
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        val_check_interval=interval,
        val_batches=n_val,
        save_interval=max(0, int(config.save_interval)),
    )


def _capping_key(config: TrainerConfig, plan: StepPlan, prefix: str) -> str:
    """The setting that decides ``plan.max_steps``, with its value."""
    if 0 <= config.max_steps < plan.steps_per_epoch * config.max_epochs:
        return f"{prefix}.max_steps={config.max_steps}"
    return f"{prefix}.max_epochs={config.max_epochs} x {plan.steps_per_epoch} steps per epoch"


def resume_length_note(
    saved_max_steps: int | None,
    config: TrainerConfig,
    plan: StepPlan,
    *,
    start_step: int,
    prefix: str = "trainer",
) -> str | None:
    """One line when a resumed run's length differs from the run that wrote the checkpoint.

    ``trainer.max_steps`` is capped by ``max_epochs`` (and the other way round), so raising one
    on resume may change nothing, or less than asked; the learning-rate schedule is planned over
    the run's total steps, so a new length re-plans it from the resumed step on.

    Args:
        saved_max_steps: The original run's ``max_steps`` (None: an older checkpoint without it).
        config: This run's trainer settings.
        plan: This run's plan.
        start_step: The step resumed from.
        prefix: Where the trainer's keys live in the user's configuration (the CLI's
            ``trainer.dpo``), to name the key that sets the length.

    Returns:
        The line, or None when the lengths agree (or the original is unknown).
    """
    if saved_max_steps is None or int(saved_max_steps) == plan.max_steps:
        return None
    return (
        f"run length changed on resume: the original run planned {int(saved_max_steps)} steps, "
        f"this one {plan.max_steps} (set by {_capping_key(config, plan, prefix)}); the "
        f"learning-rate schedule is re-planned over {plan.max_steps} total steps and continues "
        f"from step {start_step}"
    )


def _check_epoch_length(data: BatchSource, plan: StepPlan) -> None:
    """A `TrainData` must end its epochs where the trainer's epochs end."""
    if isinstance(data, TrainData) and data.steps_per_epoch != plan.steps_per_epoch:
        raise ValueError(
            f"the data's epochs hold {data.steps_per_epoch} global batches but the trainer's "
            f"hold {plan.steps_per_epoch} steps (limit_train_batches): build TrainData with "
            f"epoch_batches={plan.steps_per_epoch}"
        )


def _limit(limit: float, available: int) -> int:
    if isinstance(limit, float) and limit <= 1.0:
        return int(available * max(limit, 0.0))
    return min(available, int(limit))


def stop_flags(stop: StopRequest, groups: ParallelGroups) -> tuple[bool, bool]:
    """``(signalled, time_up)`` agreed by every rank (a MAX all-reduce over the world)."""
    flags = torch.tensor([float(stop.signalled), float(stop.time_up)], device=groups.device)
    if groups.world is not None and dist.get_world_size(groups.world) > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=groups.world)
    return bool(flags[0]), bool(flags[1])


@dataclass
class TrainerState:
    """The counters a checkpoint carries.

    Attributes:
        step: Optimizer steps done.
        consumed_samples: Training examples consumed (the sampler resumes from here).
        skipped_steps: Steps whose update was skipped (non-finite loss/gradient).
    """

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


class Trainer:
    """Runs an `AlgorithmStep` over a `BatchSource` with megatron's optimizer.

    The trainer owns the run's counters and its stop/validate/save decisions; everything else is
    handed in: the model (DDP-wrapped chunk), the optimizer, the reference policy, the forward,
    the learning-rate schedule and a ``save`` callback that writes a checkpoint with the extra
    state it is given and returns its path.

    A run made of several trainers one after the other (SPIN's iterations) gives each a
    ``step_offset``: the trainer counts its own steps from 0 (its data, epochs, validation and
    save intervals), and everything it reports — the sinks' step numbers and
    ``consumed_samples``, the learning-rate schedule's step, the step and counters handed to
    ``save`` — is on the run's scale (``offset + step``). ``metric_fields`` are added to every
    metrics dict it reports, and ``on_validate(run_step)`` adds metrics to each validation.
    ``on_step_end(run_step)`` runs after every applied update (a TR-DPO reference refresh).

    Attributes:
        device: The model's device; every micro-batch is moved there (`align_core.device`)
            after the reference pass and before the normaliser and the forward.
    """

    def __init__(
        self,
        *,
        config: TrainerConfig,
        algorithm: AlgorithmStep,
        model: Any,
        optimizer: Any,
        data: BatchSource,
        forward_fn: ForwardFn,
        learning_rate: Callable[[int], float],
        groups: ParallelGroups,
        reference: ReferencePolicy | None = None,
        save: Callable[[int, dict[str, Any]], str] | None = None,
        sinks: Sequence[MetricsSink] = (),
        stop: StopRequest | None = None,
        step_offset: int = 0,
        metric_fields: Mapping[str, float] | None = None,
        on_validate: Callable[[int], Mapping[str, float]] | None = None,
        on_step_end: Callable[[int], None] | None = None,
    ) -> None:
        """Wire the pieces (see the class docstring); nothing runs yet."""
        if algorithm.needs_reference and reference is None:
            raise ValueError(f"{algorithm.name} needs a reference policy")
        self.config = config
        self.algorithm = algorithm
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.forward_fn = forward_fn
        self.learning_rate = learning_rate
        self.groups = groups
        self.reference = reference
        self._save = save
        self.sinks = list(sinks) if groups.is_main else []
        self.stop = stop or StopRequest()
        self.step_offset = step_offset
        self.metric_fields = dict(metric_fields or {})
        self.on_validate = on_validate
        self.on_step_end = on_step_end
        self.state = TrainerState()
        self.plan = plan_steps(
            config,
            train_samples=data.train_samples,
            global_batch_size=data.global_batch_size,
            val_batches=data.num_val_batches,
        )
        _check_epoch_length(data, self.plan)
        self.device = module_device(model)
        self.last_train_metrics: dict[str, float] = {}
        self.last_val_metrics: dict[str, float] = {}
        self.last_checkpoint: str | None = None
        self.stop_reason: str = "completed"
        self._saved_step: int | None = None

    # ----------------------------------------------------------------------------- state

    @property
    def epoch(self) -> int:
        """0-based epoch of the next step."""
        return self.state.step // self.plan.steps_per_epoch

    @property
    def run_step(self) -> int:
        """Steps done on the run's scale (``step_offset`` + this trainer's steps)."""
        return self.step_offset + self.state.step

    @property
    def run_samples(self) -> int:
        """Training examples consumed on the run's scale."""
        return int(self._run_samples(self.state.consumed_samples))

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was skipped (non-finite loss or gradient), run-wide."""
        return self.state.skipped_steps

    def _run_samples(self, consumed_samples: float) -> float:
        return consumed_samples + self.step_offset * self.data.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        """Counters (on the run's scale), reference identity and step state, for the checkpoint."""
        out: dict[str, Any] = {
            "step": self.run_step,
            "consumed_samples": int(self._run_samples(self.state.consumed_samples)),
            "skipped_steps": self.state.skipped_steps,
            "epoch": self.epoch,
        }
        if self.reference is not None:
            out["reference"] = self.reference.state()
        if isinstance(self.algorithm, StatefulStep):
            out["algorithm"] = self.algorithm.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters saved by `state_dict` (on the run's scale).

        Raises:
            ValueError: The checkpoint was trained against a different reference strategy.
        """
        saved = (state.get("reference") or {}).get("strategy")
        if self.reference is not None and saved is not None and saved != self.reference.strategy:
            raise ValueError(
                f"the checkpoint was trained with reference strategy {saved!r}, this run "
                f"resolves to {self.reference.strategy!r}; set model.reference.strategy to match"
            )
        if isinstance(self.algorithm, StatefulStep):
            self.algorithm.load_state_dict(state.get("algorithm") or {})
        self.state = TrainerState(
            step=int(state["step"]) - self.step_offset,
            consumed_samples=int(state["consumed_samples"])
            - self.step_offset * self.data.global_batch_size,
            skipped_steps=int(state.get("skipped_steps", 0)),
        )

    # ----------------------------------------------------------------------------- collectives

    def _reduce(self, outputs: Sequence[Mapping[str, torch.Tensor]], extra: Mapping[str, float]):
        """Metric sums over micro-batches and data parallel, on every rank of the pipeline."""
        g = self.groups
        payload = None
        if g.is_last_stage:
            sums = sum_metrics(outputs)
            keys = sorted(sums) + sorted(extra)
            # One device-side stack and one copy to the collective device (no host sync per
            # metric); the host values are read once, after the reductions.
            parts = [sums[k].reshape(1).to(g.device, torch.float64) for k in sorted(sums)]
            parts.append(
                torch.tensor([float(extra[k]) for k in sorted(extra)], dtype=torch.float64).to(
                    g.device
                )
            )
            vec = torch.cat(parts)
            if g.data is not None and g.data.size() > 1:
                dist.all_reduce(vec, group=g.data)
            payload = {k: vec[i] for i, k in enumerate(keys)}
        received = broadcast_from_last_stage(payload, group=g.pipeline, device=g.device)
        keys = list(received)
        values = torch.stack([received[k].reshape(()) for k in keys]).tolist() if keys else []
        return dict(zip(keys, (float(v) for v in values), strict=True))

    # ----------------------------------------------------------------------------- steps

    def _attach_reference(self, micro_batches: list[ModelBatch], split: str) -> None:
        if not self.algorithm.needs_reference:
            return
        assert self.reference is not None
        for mb, ref in zip(
            micro_batches, self.reference.logps(micro_batches, split=split), strict=True
        ):
            mb["ref_logps"] = ref

    def _tokens(self, micro_batches: Sequence[ModelBatch]) -> float:
        # Read from the host batches, before they move: no device synchronisation.
        return float(sum(int(mb["lengths"].sum()) for mb in micro_batches))

    def _on_device(self, micro_batches: list[ModelBatch], split: str) -> list[ModelBatch]:
        """Reference log-probs attached, then every tensor on the model's device."""
        self._attach_reference(micro_batches, split)
        return to_device(micro_batches, self.device)

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics (on every rank).

        Raises:
            NonFiniteError: NaN/inf loss or gradient with ``nonfinite="stop"``.
        """
        start = time.perf_counter()
        step_number = self.state.step + 1
        micro_batches = self.data.train_micro_batches(self.state.consumed_samples)
        tokens = self._tokens(micro_batches)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro_batches = self._on_device(micro_batches, "train")
        normalizer = self.algorithm.normalizer(micro_batches, self.data.global_batch_size)
        outputs = forward_backward(
            self.model, micro_batches, self.forward_fn, self.algorithm.loss_fn(normalizer)
        )
        sums = self._reduce(outputs, {"tokens_processed": tokens})
        lr = self.learning_rate(self.run_step)
        from align_core.optim import set_learning_rate

        set_learning_rate(self.optimizer, lr)
        skipped = self.state.skipped_steps
        grad_norm = self._optimizer_step(step_number, sums)
        self.state.step = step_number
        if self.on_step_end is not None and self.state.skipped_steps == skipped:
            self.on_step_end(self.run_step)
        self.state.consumed_samples += self.data.global_batch_size
        step_time = time.perf_counter() - start
        metrics = self.algorithm.finalize_metrics(sums)
        metrics.update(
            grad_norm=grad_norm,
            lr=lr,
            consumed_samples=float(self._run_samples(self.state.consumed_samples)),
            epoch=float((step_number - 1) // self.plan.steps_per_epoch + 1),
            step_time=step_time,
            tokens_per_s=sums["tokens_processed"] / max(step_time, 1e-9),
            peak_memory=float(peak_memory_bytes(self.groups.device)),
            skipped_steps=float(self.state.skipped_steps),
        )
        return metrics

    def _optimizer_step(self, step_number: int, sums: Mapping[str, float]) -> float:
        """Check finiteness, clip, update. Returns the pre-clip gradient norm (nan if none)."""
        opt = self.optimizer
        found_inf = bool(opt.prepare_grads())
        grad_norm = math.nan if found_inf else float(opt.get_grad_norm())
        loss = sums.get("loss", math.nan)
        if found_inf or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if self.config.nonfinite == "stop" and not found_inf:
                # The loss the metrics would show (the mean), not the global batch's sum.
                shown = self.algorithm.finalize_metrics(sums).get("loss", loss)
                raise NonFiniteError(step_number, shown, grad_norm)
            self.state.skipped_steps += 1
            return grad_norm
        if self.config.gradient_clip_val > 0:
            from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

            for inner in getattr(opt, "chained_optimizers", [opt]):
                params = inner.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(
                        params, max_norm=self.config.gradient_clip_val, total_norm=grad_norm
                    )
        opt.step_with_ready_grads()
        return grad_norm

    def validate(self) -> dict[str, float]:
        """Forward-only pass over the validation batches; mean metrics over all of them."""
        outputs: list[Mapping[str, torch.Tensor]] = []
        training = self.model.training
        self.model.eval()
        try:
            for index in range(self.plan.val_batches):
                micro_batches = self._on_device(self.data.val_micro_batches(index), "val")
                normalizer = self.algorithm.normalizer(micro_batches, self.data.global_batch_size)
                outputs.extend(
                    forward_backward(
                        self.model,
                        micro_batches,
                        self.forward_fn,
                        self.algorithm.loss_fn(normalizer),
                        forward_only=True,
                    )
                )
        finally:
            self.model.train(training)
        sums = self._reduce(outputs, {})
        metrics = self.algorithm.finalize_metrics(sums)
        if self.on_validate is not None:
            metrics.update(self.on_validate(self.run_step))
        return metrics

    # ----------------------------------------------------------------------------- loop

    def _emit(self, split: Split, metrics: Mapping[str, float]) -> None:
        for sink in self.sinks:
            sink.log(split, self.run_step, metrics)

    def save(self) -> str | None:
        """Write a checkpoint now (through the ``save`` callback) and remember its path."""
        if self._save is None:
            return None
        if self._saved_step == self.state.step and self.last_checkpoint is not None:
            return self.last_checkpoint
        self.last_checkpoint = self._save(self.run_step, self.state_dict())
        self._saved_step = self.state.step
        return self.last_checkpoint

    def mark_saved(self, path: str) -> None:
        """Record that the current state is already saved at ``path`` (after a resume)."""
        self.last_checkpoint = path
        self._saved_step = self.state.step

    def fit(self) -> str:
        """Train until done; returns the stop reason (``completed``, ``max_time``, ``sigterm``).

        Raises:
            NonFiniteError: See `train_step`.
        """
        plan = self.plan
        self.stop.install()
        try:
            if self.config.val_at_start and plan.val_check_interval:
                self._validate_and_emit()
            while self.state.step < plan.max_steps:
                signalled, time_up = stop_flags(self.stop, self.groups)
                if signalled or time_up:
                    self.stop_reason = self.stop.stop_reason(signalled)
                    if time_up and plan.val_check_interval:
                        self._validate_and_emit()
                    self.save()
                    return self.stop_reason
                metrics = {**self.train_step(), **self.metric_fields}
                self.last_train_metrics = metrics
                if self.state.step % max(1, self.config.log_every_n_steps) == 0:
                    self._emit("train", metrics)
                last = self.state.step >= plan.max_steps
                interval = plan.val_check_interval
                if interval and (self.state.step % interval == 0 or last):
                    self._validate_and_emit()
                if plan.save_interval and self.state.step % plan.save_interval == 0 and not last:
                    self.save()
            self.stop_reason = "completed"
            self.save()
            return self.stop_reason
        finally:
            self.stop.restore()

    def _validate_and_emit(self) -> None:
        self.last_val_metrics = {**self.validate(), **self.metric_fields}
        self._emit("val", self.last_val_metrics)
