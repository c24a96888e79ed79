"""One SPIN run end to end (`align_core.trainer.spin.train_spin` delegates here).

Built from the shared pieces: the model source, SFT data and policy of `align_core.trainer.build`
(through an SFT view of the run), megatron DDP and optimizer, the `Checkpointer`, and one
`align_core.trainer.loop.Trainer` per iteration. Each iteration's trainer counts its own steps
from 0; this module maps them onto the run's global steps (checkpoint names, the sinks' step
numbers, ``consumed_samples``, the learning-rate schedule) and back on resume.

Two things the shared trainer has no hook for are composed here: the validation generations
(the iteration trainer's ``validate`` is wrapped on the instance) and the iteration fields of the
metrics (the trainer logs to a forwarding sink that adds them).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from align_core.algorithms.spin import SPINStep
from align_core.generation import (
    VALIDATION_STREAM,
    GenerationRow,
    RolloutResult,
    decode_rows,
    generation_length,
    generation_seeds,
    make_generator,
    optimizer_state_offloaded,
    read_generations,
    rollout,
    write_generations,
    write_jsonl_atomically,
)
from align_core.reference import TrainOnlyReference, refreshable_reference
from align_core.trainer.build import (
    build_policy,
    load_datasets,
    on_main_then_all,
    resolve_model_source,
)
from align_core.trainer.finish import FinalExports, export_final, final_formats
from align_core.trainer.loop import NonFiniteError, ParallelGroups, Trainer, TrainerState
from align_core.trainer.metrics import MetricsSink, Split
from align_core.trainer.run import RunPlan, RunResult, sft_view
from align_core.trainer.signals import StopRequest, parse_max_time
from align_core.trainer.spin import (
    IterationPlan,
    SPINRunConfig,
    plan_iterations,
    resolve_opponent_strategy,
    trainer_config,
)
from align_data.tokenize import PreferenceExample

__all__ = ["run_spin"]


class _IterationSinks:
    """Forwards one iteration's metrics to the run's sinks with run-global counters."""

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self.sinks = list(sinks)
        self.plan: IterationPlan | None = None
        self.sample_offset = 0
        self.extra: dict[str, float] = {}

    def globalize(self, split: Split, metrics: Mapping[str, float]) -> dict[str, float]:
        """Iteration-local metrics as run-global ones (plus the iteration's fields)."""
        out = dict(metrics)
        if "consumed_samples" in out:
            out["consumed_samples"] += self.sample_offset
        if split == "train":
            out.update(self.extra)
        elif out:
            out.setdefault("iteration", self.extra.get("iteration", 0.0))
        return out

    def log(self, split: Split, step: int, metrics: Mapping[str, float]) -> None:
        """`MetricsSink.log` of the iteration's trainer."""
        assert self.plan is not None
        out = self.globalize(split, metrics)
        for sink in self.sinks:
            sink.log(split, step + self.plan.start_step, out)


@dataclass
class _Generations:
    rows: list[GenerationRow]
    tokens_per_s: float
    reused: bool


def _stop_flags(stop: StopRequest, device: torch.device) -> tuple[bool, bool]:
    flags = torch.tensor([float(stop.signalled), float(stop.time_up)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def _locate(plans: Sequence[IterationPlan], step: int) -> tuple[int, int]:
    """``(position in plans, local step)`` of global ``step``; ``(len(plans), 0)`` when done."""
    for i, p in enumerate(plans):
        if p.start_step <= step < p.end_step:
            return i, step - p.start_step
    return len(plans), 0


def _iteration_seed(seed: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


def _reference_merge(run: SPINRunConfig, accumulation: int) -> int:
    size, mbs = run.spin.log_prob_forward_micro_batch_size, run.data.micro_batch_size
    if size is None:
        return 1
    if size % mbs or accumulation % (size // mbs):
        raise ValueError(
            f"model.spin.log_prob_forward_micro_batch_size {size} must be a multiple of "
            f"model.micro_batch_size {mbs} covering a divisor of the {accumulation} "
            "micro-batches of a step"
        )
    return size // mbs


def _check_config(run: SPINRunConfig) -> None:
    if run.data.packing:
        raise ValueError("model.data.packing is not supported for SPIN")
    run.spin.check_iterations(run.trainer.max_iterations)
    resolve_opponent_strategy(run.reference)


def _generations_key(
    run: SPINRunConfig, iteration: int, fingerprint: str, prompts: Sequence[list[int]], seq: int
) -> dict[str, Any]:
    """What an iteration's generations depend on, besides the opponent's weights."""
    import dataclasses

    return {
        "version": 1,
        "iteration": iteration,
        "data": fingerprint,
        "seed": run.seed,
        "prompts": len(prompts),
        "sampling": dataclasses.asdict(run.spin.sampling_params),
        "length": dataclasses.asdict(generation_length(run.spin.length_params, prompts, seq)),
    }


def _iteration_generations(
    path: Path,
    key: Mapping[str, Any],
    prompts: Sequence[list[int]],
    reals: Sequence[list[int]],
    generate: Any,
    tokenizer: Any,
    is_main: bool,
) -> _Generations:
    """Read a complete generations file, or generate (``generate()``) and write it.

    Raises:
        FileNotFoundError: ``generate`` is None and the file is missing or incomplete.
        ValueError: The file does not hold this run's prompts, or other settings made it.
    """
    found = read_generations(path, key)
    if found is not None:
        rows, meta = found
        if len(rows) != len(prompts) or any(
            r.prompt_ids != p for r, p in zip(rows, prompts, strict=True)
        ):
            raise ValueError(f"{path} does not hold the generations of this run's prompts")
        return _Generations(rows, float(meta.get("tokens_per_s", float("nan"))), reused=True)
    if generate is None:
        raise FileNotFoundError(
            f"{path} is missing or incomplete: train_on_previous_iteration needs the previous "
            "iteration's generations, which cannot be drawn again (that opponent is gone)"
        )
    result: RolloutResult = generate()
    rows = [
        GenerationRow(i, list(p), list(r), list(g), f)
        for i, (p, r, g, f) in enumerate(
            zip(prompts, reals, result.responses, result.finished, strict=True)
        )
    ]
    if is_main:
        meta = {
            "key": dict(key),
            "generated_tokens": result.tokens,
            "seconds": result.seconds,
            "tokens_per_s": result.tokens_per_s,
            "generated_length_mean": result.tokens / max(len(rows), 1),
        }
        texts = {**decode_rows(tokenizer, rows), "generated": result.texts}
        write_generations(path, rows, texts, meta)
    if dist.is_initialized():
        dist.barrier()
    return _Generations(rows, result.tokens_per_s, reused=False)


def _pairs(rows: Sequence[GenerationRow]) -> list[PreferenceExample]:
    """(real, generated) pairs, indexed by position."""
    return [
        PreferenceExample(
            np.asarray(r.prompt_ids, np.int32),
            np.asarray(r.real_ids, np.int32),
            np.asarray(r.generated_ids, np.int32),
            index=i,
        )
        for i, r in enumerate(rows)
    ]


def run_spin(run: SPINRunConfig, sinks: Sequence[MetricsSink]) -> RunResult:
    """See `align_core.trainer.spin.train_spin`."""
    from align_core.checkpoint import Checkpointer, check_resume
    from align_core.logprobs import forward_token_logps
    from align_core.optim import build_optimizer, learning_rate
    from align_core.parallel import init_distributed
    from align_core.trainer.data import TrainData
    from align_core.training import wrap_ddp
    from align_data import CollateConfig

    _check_config(run)
    ctx = init_distributed(run.parallel, seed=run.seed)
    run_dir = Path(run.run_dir)
    gen_dir = run_dir / "generations"
    on_main_then_all(lambda: gen_dir.mkdir(parents=True, exist_ok=True))
    sinks = list(sinks) if ctx.is_main else []
    groups = ParallelGroups.from_megatron(ctx.device)

    view = sft_view(run)
    source = resolve_model_source(view)
    tok = source.tokenizer
    seq = run.data.seq_length or source.model.seq_length
    datasets = load_datasets(view, tok, seq)
    prompts = [[int(t) for t in e.prompt_ids] for e in datasets.train]
    reals = [[int(t) for t in e.completion_ids] for e in datasets.train]
    val_prompts = [[int(t) for t in e.prompt_ids] for e in datasets.val]
    val_reals = [[int(t) for t in e.completion_ids] for e in datasets.val]
    gbs, mbs, spin = run.data.global_batch_size, run.data.micro_batch_size, run.spin
    val_batches = len(datasets.val) // gbs
    plans = plan_iterations(
        run.trainer,
        prompts=len(prompts),
        global_batch_size=gbs,
        val_batches=val_batches,
        train_on_previous_iteration=spin.train_on_previous_iteration,
    )
    total = plans[-1].end_step if plans else 0
    accumulation = gbs // (mbs * ctx.data_parallel_size)
    strategy = resolve_opponent_strategy(run.reference)

    policy = build_policy(source, run.parallel)
    forward_fn = functools.partial(forward_token_logps, vocab_size=tok.vocab_size)
    opponent = refreshable_reference(
        strategy,
        policy,
        forward_fn,
        merge=_reference_merge(run, accumulation),
        reference_model=build_policy(source, run.parallel) if strategy == "model" else None,
    )
    model = wrap_ddp(policy)
    optimizer = build_optimizer(model, run.optim, clip_grad=run.trainer.gradient_clip_val)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", keep_last=run.trainer.keep_last_checkpoints
    )
    collate = CollateConfig(pad_id=tok.pad_id, pad_to_multiple_of=run.data.pad_to_multiple_of or 1)
    data_state = {
        "train_prompts": len(prompts),
        "global_batch_size": gbs,
        "data": datasets.fingerprint,
        "seed": run.data.seed,
        "max_epochs": run.trainer.max_epochs,
        "limit_train_batches": run.trainer.limit_train_batches,
        "train_on_previous_iteration": spin.train_on_previous_iteration,
    }

    position, local_step, skipped, resumed = 0, 0, 0, None
    latest = checkpointer.latest_step() if run.resume else None
    if latest is not None:
        position, local_step = _locate(plans, latest)
        extra = {"opponent": opponent.checkpoint_state()} if local_step > 0 else None
        loaded = checkpointer.load(model, optimizer, extra_models=extra)
        assert loaded is not None
        check_resume(
            loaded.extra_state.get("data", {}),
            data_state,
            loaded.path,
            needs="resuming needs the same data, batch size and iteration layout",
        )
        skipped = int(loaded.trainer_state.get("skipped_steps", 0))
        resumed = str(loaded.path)
    saved: dict[str, Any] = {"path": resumed, "step": latest}
    done_steps = latest or 0

    def save_fn(plan: IterationPlan):
        def save(local: int, trainer_state: dict[str, Any]) -> str:
            step = plan.start_step + local
            state = {
                **trainer_state,
                "step": step,
                "consumed_samples": plan.start_step * gbs + trainer_state["consumed_samples"],
                "iteration": plan.iteration,
            }
            path = checkpointer.save(
                step,
                model,
                optimizer,
                trainer_state=state,
                extra_state={
                    "data": data_state,
                    "spin": {"iteration": plan.iteration, "iteration_start_step": plan.start_step},
                },
                extra_models={"opponent": opponent.checkpoint_state()},
            )
            saved.update(path=str(path), step=step)
            return str(path)

        return save

    def validation_generations(step: int) -> dict[str, float]:
        k = min(spin.val_generations, len(val_prompts))
        if k == 0:
            return {}
        ps = val_prompts[:k]
        result = rollout(
            make_generator(policy, tok, seq),
            ps,
            generation_seeds(run.seed, VALIDATION_STREAM, range(k)),
            sampling=spin.validation_sampling,
            length=generation_length(spin.length_params, ps, seq),
            micro_batch_size=spin.rollout_micro_batch_size,
            group=groups.data,
        )
        if ctx.is_main:
            rows = [
                GenerationRow(i, ps[i], val_reals[i], result.responses[i], result.finished[i])
                for i in range(k)
            ]
            texts = decode_rows(tok, rows)
            write_jsonl_atomically(
                gen_dir / f"val_step_{step:06d}.jsonl",
                [
                    {
                        "step": step,
                        "index": i,
                        "prompt": texts["prompt"][i],
                        "real": texts["real"][i],
                        "generated": result.texts[i],
                        "generated_length": len(result.responses[i]),
                        "finished": result.finished[i],
                    }
                    for i in range(k)
                ],
            )
        return {"generated_length_mean": result.tokens / k}

    def generations(iteration: int, *, may_generate: bool) -> _Generations:
        key = _generations_key(run, iteration, datasets.fingerprint, prompts, seq)
        length = generation_length(spin.length_params, prompts, seq)
        seeds = generation_seeds(run.seed, iteration, range(len(prompts)))

        def generate() -> RolloutResult:
            offload = spin.offload_optimizer_during_generation
            with (
                optimizer_state_offloaded(optimizer, model, enabled=offload),
                opponent.weights() as module,
            ):
                return rollout(
                    make_generator(module, tok, seq),
                    prompts,
                    seeds,
                    sampling=spin.sampling_params,
                    length=length,
                    micro_batch_size=spin.rollout_micro_batch_size,
                    group=groups.data,
                )

        path = gen_dir / f"iter_{iteration}.jsonl"
        return _iteration_generations(
            path, key, prompts, reals, generate if may_generate else None, tok, ctx.is_main
        )

    forward_sinks = _IterationSinks(sinks)
    if plans:
        forward_sinks.plan = plans[min(position, len(plans) - 1)]
    for sink in sinks:
        sink.start(
            RunPlan(
                algorithm="spin",  # type: ignore[arg-type]
                run_dir=str(run_dir),
                world_size=ctx.world_size,
                tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
                pipeline_model_parallel_size=run.parallel.pipeline_model_parallel_size,
                data_parallel_size=ctx.data_parallel_size,
                micro_batch_size=mbs,
                global_batch_size=gbs,
                accumulation_steps=accumulation,
                train_samples=len(prompts),
                val_samples=val_batches * gbs,
                steps_per_epoch=plans[0].steps_per_epoch if plans else 0,
                max_steps=total,
                start_step=done_steps,
                val_check_interval=plans[0].val_check_interval if plans else 0,
                save_interval=max(0, int(run.trainer.save_interval)),
                reference_strategy=strategy,
                resumed_from=resumed,
            )
        )

    last: dict[str, dict[str, float]] = {"train": {}, "val": {}}

    def result(reason: str, exports: FinalExports) -> RunResult:
        return RunResult(
            run_dir=str(run_dir),
            stop_reason=reason,  # type: ignore[arg-type]
            steps=done_steps,
            consumed_samples=done_steps * gbs,
            skipped_steps=skipped,
            last_train_metrics=last["train"],
            last_val_metrics=last["val"],
            checkpoint=saved["path"],
            nemo_path=exports.nemo,
            hf_path=exports.hf,
            reference_strategy=strategy,
        )

    stop = StopRequest(parse_max_time(run.trainer.max_time))
    reason = "completed"
    stop.install()
    try:
        for plan in plans[position:]:
            t = plan.iteration
            forward_sinks.plan, forward_sinks.sample_offset = plan, plan.start_step * gbs
            signalled, time_up = _stop_flags(stop, groups.device)
            if signalled or time_up:
                reason = stop.stop_reason(signalled)
                break
            if local_step == 0:
                opponent.refresh()
            current = generations(t, may_generate=True)
            rows = list(current.rows)
            if spin.train_on_previous_iteration and t > 0:
                rows += generations(t - 1, may_generate=False).rows
            signalled, time_up = _stop_flags(stop, groups.device)
            if signalled or time_up:
                reason = stop.stop_reason(signalled)
                break
            step = SPINStep(spin, iteration=t, group=groups.data)
            data = TrainData(
                _pairs(rows),
                datasets.val,
                step,
                collate,
                micro_batch_size=mbs,
                global_batch_size=gbs,
                data_parallel_rank=ctx.data_rank,
                data_parallel_size=ctx.data_parallel_size,
                seed=_iteration_seed(run.data.seed, t),
                shuffle=run.data.shuffle,
                epoch_batches=plan.steps_per_epoch,
            )
            first = plan.start_step + local_step == 0
            trainer = Trainer(
                config=trainer_config(
                    run.trainer,
                    max_steps=plan.steps,
                    val_at_start=run.trainer.val_at_start and first,
                ),
                algorithm=step,
                model=model,
                optimizer=optimizer,
                data=data,
                forward_fn=forward_fn,
                learning_rate=functools.partial(
                    lambda s, start: learning_rate(
                        start + s, lr=run.optim.lr, schedule=run.sched, total_steps=total
                    ),
                    start=plan.start_step,
                ),
                groups=groups,
                reference=TrainOnlyReference(opponent),  # validation: the SFT NLL
                save=save_fn(plan),
                sinks=[forward_sinks],
                stop=stop,
            )
            trainer.state = TrainerState(local_step, local_step * gbs, skipped)
            if saved["path"] is not None and saved["step"] == plan.start_step + local_step:
                trainer.mark_saved(saved["path"])
            forward_sinks.extra = {
                "iteration": float(t),
                "generation_tokens_per_s": current.tokens_per_s,
            }
            validate = trainer.validate

            def validate_and_generate(validate=validate, trainer=trainer, plan=plan):
                metrics = validate()
                metrics.update(validation_generations(plan.start_step + trainer.state.step))
                return metrics

            trainer.validate = validate_and_generate  # type: ignore[method-assign]
            try:
                reason = trainer.fit()
            finally:
                skipped = trainer.state.skipped_steps
                done_steps = plan.start_step + trainer.state.step
                for split, metrics in (
                    ("train", trainer.last_train_metrics),
                    ("val", trainer.last_val_metrics),
                ):
                    if metrics:
                        last[split] = forward_sinks.globalize(split, metrics)  # type: ignore[arg-type]
            local_step = 0
            if reason != "completed":
                break
    except NonFiniteError:
        for sink in sinks:
            sink.finish(result("nonfinite", None))
        raise
    finally:
        stop.restore()

    exports = FinalExports()
    nemo, hf = final_formats(run.export_nemo, run.export_hf, source)
    if (nemo or hf) and reason == "completed":
        exports = export_final(model, run_dir, source, nemo=nemo, hf=hf)
    out = result(reason, exports)
    for sink in sinks:
        sink.finish(out)
    return out
