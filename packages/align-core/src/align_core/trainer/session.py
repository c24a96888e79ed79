"""One training run end to end (`align_core.trainer.train` delegates here).

Order matters for the reference policy: the policy is built with its initial weights, the
reference is captured from them (snapshot, second model, or the precompute pass), and only then
is a checkpoint loaded on resume, so π_ref is always the initial policy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from align_core.algorithms._packed import packed_forward
from align_core.algorithms.contract import AlgorithmStep, ModelBatch
from align_core.algorithms.registry import REGISTRY, get_algorithm
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
from align_core.trainer.data import TrainData
from align_core.trainer.finish import FinalExports, export_final, final_formats, fit_and_finish
from align_core.trainer.loop import ParallelGroups, StepPlan, Trainer, resume_length_note
from align_core.trainer.metrics import MetricsSink, announce, shows_status
from align_core.trainer.run import RunConfig, RunPlan, RunResult
from align_core.trainer.signals import StopRequest, parse_max_time

__all__ = ["run_training"]


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
    data: TrainData,
    plan: StepPlan,
    data_fingerprint: str,
    groups: ParallelGroups,
    sinks: Sequence[MetricsSink] = (),
) -> ReferencePolicy:
    from megatron.core import parallel_state as ps

    merge = reference_merge(run)
    if merge > 1 and data.accumulation_steps % merge:
        raise ValueError(
            f"log_prob_forward_micro_batch_size covers {merge} training micro-batches, which "
            f"does not divide the {data.accumulation_steps} micro-batches of a step"
        )
    if strategy == "swap":
        return SwapReference(policy, forward_fn, merge=merge)
    if strategy == "model":
        reference = build_policy(source, run.parallel)
        # The base weights (LoRA adapters, zero-initialised, are not part of the reference).
        base = {k: v for k, v in policy.state_dict().items() if "_lora." not in k}
        reference.load_state_dict(base)
        return ModelReference(reference, forward_fn, merge=merge)
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


def run_training(run: RunConfig, sinks: Sequence[MetricsSink]) -> RunResult:
    """See `align_core.trainer.train`."""
    from align_core.checkpoint import Checkpointer, check_resume
    from align_core.logprobs import forward_token_logps
    from align_core.optim import build_optimizer, learning_rate
    from align_core.parallel import init_distributed
    from align_core.training import wrap_ddp
    from align_data import CollateConfig

    _check_config(run)
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
    algorithm: AlgorithmStep = build_algorithm(run, groups.data)
    policy = build_policy(source, run.parallel)
    lora = run.peft is not None
    if lora:
        from align_core.lora import add_lora

        add_lora(policy, run.peft)
    forward_fn: ForwardFn = functools.partial(
        forward_token_logps, vocab_size=source.tokenizer.vocab_size
    )
    capacity = _pack_capacity(run, seq_length)
    if capacity is not None:
        forward_fn = packed_forward(forward_fn)
    collate = CollateConfig(
        pad_id=source.tokenizer.pad_id,
        pad_to_multiple_of=run.data.pad_to_multiple_of or 1,
        default_chosen_reward=run.data.default_chosen_reward,
        default_rejected_reward=run.data.default_rejected_reward,
    )
    plan = _plan(run, len(datasets.train), len(datasets.val))
    data = TrainData(
        datasets.train,
        datasets.val,
        algorithm,
        collate,
        micro_batch_size=run.data.micro_batch_size,
        global_batch_size=run.data.global_batch_size,
        data_parallel_rank=ctx.data_rank,
        data_parallel_size=ctx.data_parallel_size,
        seed=run.data.seed,
        shuffle=run.data.shuffle,
        per_epoch_cache_rows=get_algorithm(run.algorithm).per_epoch_reference,
        pack_capacity=capacity,
        epoch_batches=plan.steps_per_epoch,
    )
    stop = StopRequest(parse_max_time(run.trainer.max_time))

    strategy = "none"
    reference = None
    if needs_reference(run):
        strategy = resolve_strategy(run.reference.strategy, lora=lora)
        reference = _build_reference(
            run,
            strategy,
            policy,
            source,
            forward_fn,
            data,
            plan,
            datasets.fingerprint,
            groups,
            sinks,
        )

    model = wrap_ddp(policy)
    optimizer = build_optimizer(model, run.optim, clip_grad=run.trainer.gradient_clip_val)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", keep_last=run.trainer.keep_last_checkpoints
    )
    data_state = {
        "train_samples": len(data.train),
        "global_batch_size": data.global_batch_size,
        "data": datasets.fingerprint,
        "seed": data.seed,
    }

    # The architecture, for `align ckpt inspect` (plain values only: read back weights-only).
    model_summary = {
        k: v
        for k, v in dataclasses.asdict(source.model).items()
        if v is None or isinstance(v, (bool, int, float, str))
    }

    def save(step: int, trainer_state: dict[str, Any]) -> str:
        path = checkpointer.save(
            step,
            model,
            optimizer,
            trainer_state=trainer_state,
            extra_state={
                "data": data_state,
                "plan": {"max_steps": plan.max_steps},
                "model": model_summary,
            },
        )
        return str(path)

    trainer = Trainer(
        config=run.trainer,
        algorithm=algorithm,
        model=model,
        optimizer=optimizer,
        data=data,
        forward_fn=forward_fn,
        learning_rate=lambda step: learning_rate(
            step, lr=run.optim.lr, schedule=run.sched, total_steps=plan.max_steps
        ),
        groups=groups,
        reference=reference,
        save=save,
        sinks=sinks,
        stop=stop,
    )
    resumed = None
    resume_note = None
    if run.resume:
        loaded = checkpointer.load(model, optimizer)
        if loaded is not None:
            check_resume(
                loaded.extra_state.get("data", {}),
                data_state,
                loaded.path,
                needs="resume needs the same data and global batch size",
            )
            trainer.load_state_dict(loaded.trainer_state)
            resumed = str(loaded.path)
            trainer.mark_saved(resumed)
            resume_note = resume_length_note(
                loaded.extra_state.get("plan", {}).get("max_steps"),
                run.trainer,
                plan,
                start_step=trainer.state.step,
                prefix=f"trainer.{run.algorithm}",
            )

    run_plan = RunPlan(
        algorithm=run.algorithm,
        run_dir=str(run_dir),
        world_size=ctx.world_size,
        tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.parallel.pipeline_model_parallel_size,
        data_parallel_size=ctx.data_parallel_size,
        micro_batch_size=data.micro_batch_size,
        global_batch_size=data.global_batch_size,
        accumulation_steps=data.accumulation_steps,
        train_samples=len(data.train),
        val_samples=plan.val_batches * data.global_batch_size,
        steps_per_epoch=plan.steps_per_epoch,
        max_steps=plan.max_steps,
        start_step=trainer.state.step,
        val_check_interval=plan.val_check_interval,
        save_interval=plan.save_interval,
        reference_strategy=strategy,
        resumed_from=resumed,
        resume_note=resume_note,
    )
    for sink in sinks:
        sink.start(run_plan)

    nemo, hf = final_formats(run.export_nemo, run.export_hf, source)

    def export() -> FinalExports:
        if lora:
            from align_core.lora import merge_lora

            merge_lora(policy)
        return export_final(model, run_dir, source, nemo=nemo, hf=hf)

    return fit_and_finish(
        trainer,
        sinks,
        run_dir=run_dir,
        reference_strategy=strategy,
        export=export if nemo or hf else None,
    )


def _check_config(run: RunConfig) -> None:
    """Errors that need no data or model, raised before anything is built."""
    if run.algorithm == "kto" and run.data.micro_batch_size < 2:
        raise ValueError(
            "KTO pairs prompt_i with completion_(i+1 mod B) inside each micro-batch for its KL "
            f"estimate, so model.micro_batch_size must be >= 2 (got {run.data.micro_batch_size})"
        )


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


def _plan(run: RunConfig, train_samples: int, val_samples: int) -> StepPlan:
    from align_core.trainer.loop import plan_steps

    gbs = run.data.global_batch_size
    return plan_steps(
        run.trainer,
        train_samples=train_samples,
        global_batch_size=gbs,
        val_batches=val_samples // gbs,
    )
