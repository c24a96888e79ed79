"""Checks of a prepared run that need no pass over its data, made before any worker starts.

``align run`` makes them before launching (in this process, or before torchrun starts the
workers), and ``--dry-run`` before planning: the parallel layout and batch sizes, the model
(``--restore``: the checkpoint is opened and its configuration read), the data files, the
reference strategy and a distillation run's teacher. A mistake there is one line naming the key
or option to change, with exit status 2, and no run directory is written. Every record is then
validated by the workers (or by ``--dry-run``), with the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align_cli.errors import UsageError

if TYPE_CHECKING:
    from align_cli.commands.run import Prepared

__all__ = [
    "Preflight",
    "batch_hint",
    "check_batch",
    "check_data_file",
    "check_data_files",
    "check_positions",
    "check_resumed_model",
    "core_view",
    "data_parallel_size",
    "model_line",
    "model_source",
    "preflight",
    "resolved_reference",
    "with_batch_hint",
]


def model_source(run: Any) -> Any:
    """The architecture and tokenizer the trainer will use (align-core's own resolution)."""
    from align_core.trainer.build import resolve_model_source

    try:
        return resolve_model_source(run)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def core_view(algorithm: str, run: Any) -> Any:
    """align-core's `RunConfig` of a run: itself, or an SFT view of a SPIN or distillation run.

    SPIN and distillation read SFT data and resolve their model as an SFT run would.
    """
    if algorithm not in ("spin", "kd"):
        return run
    from align_core.trainer import sft_view

    return sft_view(run)


def resolved_reference(algorithm: str, run: Any) -> str:
    """The reference strategy the trainer will use (``none`` when the algorithm needs none).

    Whether a reference is needed is the algorithm registry's answer for the run's settings;
    the strategy is resolved by align-core's `resolve_strategy`, the check training makes.

    Raises:
        UsageError: A strategy that cannot apply (``adapters`` without LoRA), or a SPIN
            opponent strategy that cannot hold the opponent; the message names the key.
    """
    from align_core.algorithms import get_algorithm

    if algorithm == "spin":
        from align_core.trainer.spin import resolve_opponent_strategy

        try:
            return resolve_opponent_strategy(run.reference)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    spec = get_algorithm(algorithm)
    if not spec.needs_reference(getattr(run, spec.section)):
        return "none"
    from align_core.reference import resolve_strategy

    try:
        return resolve_strategy(
            run.reference.strategy, lora=run.peft is not None, updated=run.reference.updated
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def data_parallel_size(run: Any, world_size: int) -> int:
    """Data-parallel replicas of ``run`` on ``world_size`` processes (align-core's planner).

    Raises:
        UsageError: The processes cannot hold TP × PP × CP.
    """
    from align_core.trainer.planner import data_parallel_size as replicas

    try:
        return replicas(run.parallel, world_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def check_batch(run: Any, world_size: int) -> tuple[int, int]:
    """The data-parallel size and gradient accumulation steps of ``run``'s batch sizes.

    align-core's planner (`align_core.trainer.planner.plan_layout`) derives them, as training
    does.

    Raises:
        UsageError: A layout the processes cannot hold, or a global batch that is not a
            multiple of micro batch × data-parallel size (naming the nearest values that are).
    """
    from align_core.trainer.planner import plan_layout

    try:
        layout = plan_layout(run.parallel, run.data, world_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return layout.data_parallel_size, layout.accumulation_steps


def batch_hint(examples: int, run: Any, world_size: int) -> str:
    """What to set when ``examples`` do not fill one global batch of ``run``."""
    try:
        dp = data_parallel_size(run, world_size)
    except UsageError:
        dp = 1
    per_step = run.data.micro_batch_size * dp
    largest = examples // per_step * per_step
    if largest == 0:
        return (
            f"use more data, or fewer than {examples + 1} examples per step: "
            f"model.micro_batch_size × data-parallel size is {per_step}"
        )
    multiple = f", a multiple of {per_step} = micro {run.data.micro_batch_size} × DP {dp}"
    return f"use model.global_batch_size ≤ {largest}" + (multiple if per_step > 1 else "")


_UNFILLED = re.compile(r"(\d+) training examples do not fill one global batch")


def with_batch_hint(exc: ValueError, run: Any, world_size: int) -> ValueError | UsageError:
    """align-core's "N training examples do not fill one global batch" with what to set.

    Other errors are returned as they are.
    """
    match = _UNFILLED.match(str(exc))
    if match is None:
        return exc
    return UsageError(f"{exc}; {batch_hint(int(match.group(1)), run, world_size)}")


def check_data_files(algorithm: str, run: Any) -> None:
    """Every data file the run names exists (the synthetic task needs none).

    Raises:
        UsageError: A missing file, naming the key that gave it.
    """
    if algorithm == "kd" and run.teacher.nemo_jsonl:
        key = "model.knowledge_distillation.teacher"
        splits = {
            "nemo_jsonl": run.teacher.nemo_jsonl,
            "nemo_jsonl_validation": run.teacher.nemo_jsonl_validation,
        }
        for name, paths in splits.items():
            for path in paths:
                check_data_file(f"{key}.{name}", path)
        return
    data = core_view(algorithm, run).data
    key = "model.data.train_ds.file_path" if algorithm == "spin" else "model.data.data_prefix"
    for path in (*data.train_files, *data.validation_files):
        check_data_file(key, path)


def check_data_file(key: str, path: str) -> None:
    """``path`` is a readable regular file (align-data's check, before anything opens it).

    Raises:
        UsageError: ``key: path: no such file`` (or ``is a directory``, ``not a regular file
            (a FIFO)``, ``not readable``).
    """
    from align_data import DataError, check_source_file

    try:
        check_source_file(path)
    except DataError as exc:
        raise UsageError(f"{key}: {exc}") from exc


def check_positions(algorithm: str, run: Any, model: Any) -> None:
    """The run's sequence length fits the model's positions (align-core's `check_seq_length`).

    A RoPE model asked to train beyond its trained length gets a warning on stderr (rank 0).

    Raises:
        UsageError: A learned-absolute-position model asked for more positions than it has.
    """
    import sys

    from align_cli.launch import world_rank
    from align_core.positions import check_seq_length

    key = "model.data.train_ds.max_seq_length" if algorithm == "spin" else "model.data.seq_length"
    seq_length = core_view(algorithm, run).data.seq_length or model.seq_length
    try:
        warning = check_seq_length(model, seq_length, key=key)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if warning and world_rank() == 0:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def check_resumed_model(algorithm: str, run: Any, model: Any, run_dir: Path) -> None:
    """A resumed run keeps the architecture and LoRA adapters of the checkpoint it resumes.

    Checked before the run directory's ``config.yaml`` is rewritten, against the checkpoint
    ``--resume`` will load (the newest intact one).

    Raises:
        UsageError: Naming the key, the checkpoint's value and this run's.
    """
    from align_core.checkpoint import Checkpointer
    from align_core.checkpoint_checks import check_resume_model, read_checkpoint_summary

    checkpoints = Checkpointer(run_dir / "checkpoints", keep_last=1)
    try:
        step, _ = checkpoints.newest_intact()
        if step is None:
            return
        path = checkpoints.path(step)
        lora = getattr(core_view(algorithm, run), "peft", None) is not None
        check_resume_model(
            read_checkpoint_summary(path), dataclasses.asdict(model), lora=lora, path=path
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


@dataclass(frozen=True)
class Preflight:
    """What the checks before launching found.

    Attributes:
        source: `model_source` of the run (architecture and tokenizer).
        data_parallel_size: Data-parallel replicas.
        accumulation: Micro-batches per optimizer step on each replica.
        reference: The resolved reference strategy (``none`` without one).
        reference_row: The plan's row describing the reference, opponent or teacher.
    """

    source: Any
    data_parallel_size: int
    accumulation: int
    reference: str
    reference_row: tuple[str, str]


def preflight(prepared: Prepared) -> Preflight:
    """The checks of ``--dry-run`` that need no pass over the data, before any worker starts.

    The layout and batch sizes, the model (``--restore``: the checkpoint is opened and its
    configuration read), the data files, the reference strategy and the teacher of a
    distillation run. Every record is validated, and the steps planned, by the workers
    (errors there are one line too).

    Raises:
        UsageError: The first problem found, naming the key or option to change.
    """
    algorithm = prepared.composed.algorithm
    run = prepared.run
    dp, accumulation = check_batch(run, prepared.launch.world_size)
    from align_core.algorithms import get_algorithm

    if get_algorithm(algorithm).shared_loop:
        from align_core.trainer.session import check_run_config

        try:
            check_run_config(run)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    source = model_source(core_view(algorithm, run))
    check_positions(algorithm, run, source.model)
    if prepared.resumed and getattr(run, "resume", False):
        check_resumed_model(algorithm, run, source.model, prepared.run_dir)
    check_data_files(algorithm, run)
    reference = resolved_reference(algorithm, run)
    row = _reference_row(algorithm, run, reference, source)
    return Preflight(source, dp, accumulation, reference, row)


def _reference_row(algorithm: str, run: Any, reference: str, source: Any) -> tuple[str, str]:
    if algorithm == "spin":
        return "opponent", f"{run.reference.strategy} -> {reference} (refreshed every iteration)"
    if algorithm == "kd":
        return "teacher", _teacher_line(run, int(source.tokenizer.vocab_size))
    if algorithm == "sft":
        return "reference", "none"
    if reference == "none":
        return "reference", "none (the objective needs no reference)"
    return "reference", f"{run.reference.strategy} -> {reference}"


def _teacher_line(run: Any, student_vocab: int) -> str:
    """Check a distillation run's teacher source as training will; describe it.

    Raises:
        UsageError: A missing teacher, an incomplete teacher pass, or vocabularies that differ
            without ``cross_tokenizer``.
    """
    from align_kd.step import check_vocabularies

    teacher = run.teacher
    kd = run.knowledge_distillation
    key = "model.knowledge_distillation.teacher"
    try:
        if teacher.online:
            if not Path(teacher.restore_from_path).exists():
                raise UsageError(
                    f"{key}.restore_from_path: {teacher.restore_from_path}: no such file"
                )
            view = dataclasses.replace(
                core_view("kd", run), restore_from_path=teacher.restore_from_path, model=None
            )
            model = model_source(view)
            check_vocabularies(
                teacher_vocab_size=int(model.tokenizer.vocab_size),
                student_vocab_size=student_vocab,
                cross_tokenizer=kd.cross_tokenizer,
            )
            kd.effective_top_k(teacher.top_k)
            host = " (weights on the host between passes)" if teacher.placement == "host" else ""
            line = model_line(model.model, teacher.restore_from_path)
            return f"online, top-{teacher.top_k}{host}: {line}"
        if teacher.directory:
            from align_kd.teacher import open_teacher_store, teacher_vocab_size

            root = Path(teacher.directory)
            if not (root / "train").is_dir():
                raise UsageError(
                    f"{key}.directory: {root} holds no train/ store "
                    "(write it with `align kd teacher ... output=DIR`)"
                )
            reader = open_teacher_store(root / "train")
            check_vocabularies(
                teacher_vocab_size=teacher_vocab_size(root / "train"),
                student_vocab_size=student_vocab,
                cross_tokenizer=kd.cross_tokenizer,
            )
            kd.effective_top_k(reader.top_k)
            return f"offline stores: {root} ({len(reader):,} train samples, top-{reader.top_k})"
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return f"NeMo-Aligner JSONL: {', '.join(teacher.nemo_jsonl)}"


def model_line(model: Any, restore_from_path: str | None) -> str:
    """One line describing an architecture and where its weights come from."""
    source = restore_from_path or "fresh (random init)"
    fields = dataclasses.asdict(model)
    return (
        f"{source}: {fields['num_layers']} layers, hidden {fields['hidden_size']}, "
        f"{fields['num_attention_heads']} heads, vocab {fields['vocab_size']}, "
        f"{fields['dtype']}"
    )
