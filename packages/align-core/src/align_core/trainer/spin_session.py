"""One SPIN run (`align_core.trainer.spin.train_spin` delegates here): a `Recipe` of stages.

SPIN runs through the session every algorithm uses (`align_core.trainer.session.run_session`:
model, DDP, optimizer, checkpoints, resume, sinks, export). What it adds is the outer loop of
`Recipe.stages`: per iteration, refresh the opponent (at the iteration's first step), read or
generate its answers, and yield a `Stage` training on (real, generated) pairs with that
iteration's β. Each stage's trainer counts from the iteration's first run step (``step_offset``),
adds ``iteration`` and the rollout's speed to its metrics and saves the iteration with each
checkpoint; the opponent is an extra model of every checkpoint, and each validation also
answers ``spin.val_generations`` held-out prompts greedily.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
    forward_merge,
    load_datasets,
    on_main_then_all,
    resolve_model_source,
)
from align_core.trainer.loop import ParallelGroups
from align_core.trainer.metrics import MetricsSink
from align_core.trainer.planner import plan_layout
from align_core.trainer.run import RunResult, sft_view
from align_core.trainer.session import Recipe, Session, Stage, run_session
from align_core.trainer.spin import (
    IterationPlan,
    SPINRunConfig,
    resolve_opponent_strategy,
    spin_steps,
    trainer_config,
)
from align_data import CollateConfig
from align_data.tokenize import PreferenceExample

__all__ = ["run_spin"]


@dataclass
class _Generations:
    rows: list[GenerationRow]
    tokens_per_s: float
    reused: bool


def _locate(plans: Sequence[IterationPlan], step: int) -> tuple[int, int]:
    """``(position in plans, local step)`` of global ``step``; ``(len(plans), 0)`` when done."""
    for i, p in enumerate(plans):
        if p.start_step <= step < p.end_step:
            return i, step - p.start_step
    return len(plans), 0


def _iteration_seed(seed: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


def _check_config(run: SPINRunConfig) -> None:
    if run.data.packing:
        raise ValueError("model.data.packing is not supported for SPIN")
    run.spin.check_iterations(run.trainer.max_iterations)
    resolve_opponent_strategy(run.reference)


def _generations_key(
    run: SPINRunConfig, iteration: int, fingerprint: str, prompts: Sequence[list[int]], seq: int
) -> dict[str, Any]:
    """What an iteration's generations depend on, besides the opponent's weights."""
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
    from align_core.logprobs import forward_token_logps
    from align_core.parallel import init_distributed

    _check_config(run)
    ctx = init_distributed(run.parallel, seed=run.seed)
    gen_dir = Path(run.run_dir) / "generations"
    on_main_then_all(lambda: gen_dir.mkdir(parents=True, exist_ok=True))
    data_group = ParallelGroups.from_megatron(ctx.device).data

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
    iterations, steps = spin_steps(
        run.trainer,
        prompts=len(prompts),
        global_batch_size=gbs,
        val_batches=len(datasets.val) // gbs,
        train_on_previous_iteration=spin.train_on_previous_iteration,
    )
    strategy = resolve_opponent_strategy(run.reference)
    policy = build_policy(source, run.parallel)
    forward_fn = functools.partial(forward_token_logps, vocab_size=tok.vocab_size)
    opponent = refreshable_reference(
        strategy,
        policy,
        forward_fn,
        merge=forward_merge(
            "spin",
            spin.log_prob_forward_micro_batch_size,
            micro_batch_size=mbs,
            accumulation=plan_layout(run.parallel, run.data, ctx.world_size).accumulation_steps,
        ),
        reference_model=build_policy(source, run.parallel) if strategy == "model" else None,
    )

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
            group=data_group,
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

    def generations(iteration: int, session: Session | None) -> _Generations:
        """Iteration's answers: read back, or (with a ``session``) drawn by the opponent."""
        key = _generations_key(run, iteration, datasets.fingerprint, prompts, seq)
        length = generation_length(spin.length_params, prompts, seq)
        seeds = generation_seeds(run.seed, iteration, range(len(prompts)))

        def generate() -> RolloutResult:
            assert session is not None
            offload = spin.offload_optimizer_during_generation
            with (
                optimizer_state_offloaded(session.optimizer, session.model, enabled=offload),
                opponent.weights() as module,
            ):
                return rollout(
                    make_generator(module, tok, seq),
                    prompts,
                    seeds,
                    sampling=spin.sampling_params,
                    length=length,
                    micro_batch_size=spin.rollout_micro_batch_size,
                    group=session.groups.data,
                )

        path = gen_dir / f"iter_{iteration}.jsonl"
        return _iteration_generations(
            path, key, prompts, reals, generate if session else None, tok, ctx.is_main
        )

    def stages(session: Session) -> Iterator[Stage]:
        position, local_step = _locate(iterations, session.resumed_step or 0)
        for plan in iterations[position:]:
            t = plan.iteration
            if session.should_stop():
                return
            if local_step == 0:
                opponent.refresh()
            current = generations(t, session)
            rows = list(current.rows)
            if spin.train_on_previous_iteration and t > 0:
                rows += generations(t - 1, None).rows
            if session.should_stop():
                return
            first = plan.start_step + local_step == 0
            yield Stage(
                SPINStep(spin, iteration=t, group=session.groups.data),
                _pairs(rows),
                seed=_iteration_seed(run.data.seed, t),
                start_step=plan.start_step,
                steps_per_epoch=plan.steps_per_epoch,
                trainer=trainer_config(
                    run.trainer,
                    max_steps=plan.steps,
                    val_at_start=run.trainer.val_at_start and first,
                ),
                reference=TrainOnlyReference(opponent),  # validation: the SFT NLL
                metric_fields={
                    "iteration": float(t),
                    "generation_tokens_per_s": current.tokens_per_s,
                },
                trainer_state={"iteration": t},
                extra_state={"spin": {"iteration": t, "iteration_start_step": plan.start_step}},
            )
            local_step = 0

    recipe = Recipe(
        algorithm="spin",
        source=source,
        policy=policy,
        step=None,
        train=datasets.train,
        val=datasets.val,
        forward_fn=forward_fn,
        collate=CollateConfig(
            pad_id=tok.pad_id, pad_to_multiple_of=run.data.pad_to_multiple_of or 1
        ),
        data_state={
            "train_prompts": len(prompts),
            "global_batch_size": gbs,
            "data": datasets.fingerprint,
            "seed": run.data.seed,
            "max_epochs": run.trainer.max_epochs,
            "limit_train_batches": run.trainer.limit_train_batches,
            "train_on_previous_iteration": spin.train_on_previous_iteration,
        },
        resume_needs="resuming needs the same data, batch size and iteration layout",
        reference_strategy=strategy,
        stages=stages,
        steps=steps,
        extra_models=lambda: {"opponent": opponent.checkpoint_state()},
        on_validate=validation_generations,
    )
    return run_session(run, recipe, ctx, sinks)
