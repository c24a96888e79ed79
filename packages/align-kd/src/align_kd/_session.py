"""The student run once its pieces exist: trainer loop, checkpoints, resume, export.

This mirrors ``align_core.trainer.session.run_training`` (which fixes the algorithm, the forward
and the data source to align-core's own) with the distillation step, the logits forward and,
online, a batch source that asks the teacher for its top-k; the end of the run (fit, export,
sinks) is align-core's `fit_and_finish`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align_core.trainer import RunConfig, RunPlan, RunResult
from align_core.trainer.metrics import MetricsSink

__all__ = ["fit"]


def fit(
    run: Any,
    base: RunConfig,
    ctx: Any,
    source: Any,
    policy: Any,
    step: Any,
    train: Sequence[Any],
    val: Sequence[Any],
    teacher: Any,
    sinks: Sequence[MetricsSink],
) -> RunResult:
    """Train ``policy`` with ``step`` over ``train``/``val`` (see `align_kd.train.train_kd`)."""
    from align_core.checkpoint import Checkpointer, check_resume
    from align_core.optim import build_optimizer, learning_rate
    from align_core.trainer.data import TrainData
    from align_core.trainer.finish import export_final, final_formats, fit_and_finish
    from align_core.trainer.loop import ParallelGroups, Trainer, plan_steps
    from align_core.trainer.signals import StopRequest, parse_max_time
    from align_core.training import wrap_ddp
    from align_data import CollateConfig
    from align_kd.forward import logits_forward
    from align_kd.online import OnlineTeacherData

    run_dir = Path(run.run_dir)
    sinks = list(sinks) if ctx.is_main else []
    groups = ParallelGroups.from_megatron(ctx.device)
    collate = CollateConfig(
        pad_id=source.tokenizer.pad_id, pad_to_multiple_of=run.data.pad_to_multiple_of or 1
    )
    plan = plan_steps(
        run.trainer,
        train_samples=len(train),
        global_batch_size=run.data.global_batch_size,
        val_batches=len(val) // run.data.global_batch_size,
    )
    inner = TrainData(
        train,
        val,
        step,
        collate,
        micro_batch_size=run.data.micro_batch_size,
        global_batch_size=run.data.global_batch_size,
        data_parallel_rank=ctx.data_rank,
        data_parallel_size=ctx.data_parallel_size,
        seed=run.data.seed,
        shuffle=run.data.shuffle,
        epoch_batches=plan.steps_per_epoch,
    )
    data: Any = inner if teacher is None else OnlineTeacherData(inner, teacher)
    model = wrap_ddp(policy)
    optimizer = build_optimizer(model, run.optim, clip_grad=run.trainer.gradient_clip_val)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", keep_last=run.trainer.keep_last_checkpoints
    )
    data_state = {
        "train_samples": len(train),
        "global_batch_size": inner.global_batch_size,
        "seed": inner.seed,
        "teacher": "online" if teacher is not None else "offline",
    }

    def save(step_number: int, trainer_state: dict[str, Any]) -> str:
        return str(
            checkpointer.save(
                step_number,
                model,
                optimizer,
                trainer_state=trainer_state,
                extra_state={"data": data_state},
            )
        )

    trainer = Trainer(
        config=run.trainer,
        algorithm=step,
        model=model,
        optimizer=optimizer,
        data=data,
        forward_fn=logits_forward,
        learning_rate=lambda s: learning_rate(
            s, lr=run.optim.lr, schedule=run.sched, total_steps=plan.max_steps
        ),
        groups=groups,
        save=save,
        sinks=sinks,
        stop=StopRequest(parse_max_time(run.trainer.max_time)),
    )
    resumed = None
    if run.resume:
        loaded = checkpointer.load(model, optimizer)
        if loaded is not None:
            check_resume(loaded.extra_state.get("data", {}), data_state, loaded.path)
            trainer.load_state_dict(loaded.trainer_state)
            trainer.last_checkpoint = resumed = str(loaded.path)

    run_plan = RunPlan(
        algorithm="kd",  # type: ignore[arg-type]
        run_dir=str(run_dir),
        world_size=ctx.world_size,
        tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.parallel.pipeline_model_parallel_size,
        data_parallel_size=ctx.data_parallel_size,
        micro_batch_size=inner.micro_batch_size,
        global_batch_size=inner.global_batch_size,
        accumulation_steps=inner.accumulation_steps,
        train_samples=len(train),
        val_samples=plan.val_batches * inner.global_batch_size,
        steps_per_epoch=plan.steps_per_epoch,
        max_steps=plan.max_steps,
        start_step=trainer.state.step,
        val_check_interval=plan.val_check_interval,
        save_interval=plan.save_interval,
        reference_strategy="none",
        resumed_from=resumed,
    )
    for sink in sinks:
        sink.start(run_plan)

    nemo, hf = final_formats(run.export_nemo, run.export_hf, source)
    return fit_and_finish(
        trainer,
        sinks,
        run_dir=run_dir,
        reference_strategy="none",
        export=(
            (lambda: export_final(model, run_dir, source, nemo=nemo, hf=hf)) if nemo or hf else None
        ),
    )
