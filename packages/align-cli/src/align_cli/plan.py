"""``align run ... --dry-run``: check configuration and data, print the plan, train nothing.

The plan: the parallel layout (TP × PP × DP, accumulation), the data (examples, tokens, the
truncation/drop counts; every record is validated and tokenized exactly as training would, so a
malformed record fails here with ``file:line: field: message``), the step accounting (align-core's
`plan_steps`, the trainer's own rule), and an estimate of memory per rank.

The memory estimate counts parameters analytically from the architecture (megatron's GPT layout)
and uses the usual rules of thumb: weights in the model dtype, fp32 gradients, Adam's two fp32
moments (plus an fp32 master copy for bf16/fp16), the reference policy by strategy, and
activations per micro-batch after Korthikanti et al. (2022), ``s·b·h·(34 + 5·a·s/h)`` bytes per
layer at 16 bits (doubled for fp32), divided by TP; selective recomputation drops the attention
term (``34·s·b·h``), full recomputation keeps one layer input (``2·s·b·h``) per checkpoint plus
the layers recomputed at once. It is an estimate to catch gross misfits, not a measurement.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from align_cli.errors import UsageError
from align_cli.preflight import (
    check_data_file,
    core_view,
    model_line,
    model_source,
    preflight,
    with_batch_hint,
)

if TYPE_CHECKING:
    from align_cli.commands.run import Prepared

__all__ = [
    "DataPlan",
    "MemoryEstimate",
    "core_view",
    "count_parameters",
    "dry_run",
    "estimate_memory",
    "model_line",
    "model_source",
    "plan_data",
    "plan_nemo_kd_data",
]

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def count_parameters(model: Any, tensor_parallel_size: int = 1) -> int:
    """Parameters of a megatron-core GPT with this `ModelConfig` (vocabulary padded as megatron).

    Embedding (plus learned positions), per layer: two norms, QKV, output projection, MLP
    (gated MLPs have a doubled first projection), the final norm and an untied output layer.
    """
    from align_core.config import padded_vocab_size

    h = model.hidden_size
    kv_channels = model.kv_channels or h // model.num_attention_heads
    groups = model.num_query_groups or model.num_attention_heads
    q_dim = model.num_attention_heads * kv_channels
    kv_dim = groups * kv_channels
    norm = h * (2 if model.normalization == "LayerNorm" else 1)
    bias = 1 if model.bias else 0
    fc1_out = model.ffn_hidden_size * (2 if model.gated else 1)
    layer = (
        2 * norm
        + h * (q_dim + 2 * kv_dim)
        + bias * (q_dim + 2 * kv_dim)
        + q_dim * h
        + bias * h
        + h * fc1_out
        + bias * fc1_out
        + model.ffn_hidden_size * h
        + bias * h
    )
    vocab = padded_vocab_size(
        model.vocab_size, model.make_vocab_size_divisible_by, tensor_parallel_size
    )
    total = vocab * h + model.num_layers * layer + norm
    if model.position_embedding_type == "learned_absolute":
        total += model.seq_length * h
    if not model.share_embeddings_and_output_weights:
        total += vocab * h
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by what holds them.

    Attributes:
        parameters: Parameters held by one rank (split over TP and PP).
        weights: Model weights in the model dtype.
        gradients: fp32 gradient buffer.
        optimizer: Adam moments (and fp32 master weights for 16-bit models).
        reference: Device memory of the reference policy (``model`` strategy only).
        reference_host: Host memory of the reference policy (``swap``: pinned CPU copy).
        activations: Activations of one micro-batch kept for the backward.
    """

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    reference: int
    reference_host: int
    activations: int

    @property
    def device_total(self) -> int:
        """Everything on the compute device."""
        return self.weights + self.gradients + self.optimizer + self.reference + self.activations


def estimate_memory(
    model: Any,
    *,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    micro_batch_size: int,
    seq_length: int,
    sequences_per_example: int,
    reference_strategy: str,
    parallel: Any = None,
) -> MemoryEstimate:
    """Rule-of-thumb memory per rank (see the module docstring).

    ``parallel`` (an `align_core.ParallelConfig`) supplies the activation recomputation; None
    keeps every activation.
    """
    params = count_parameters(model, tensor_parallel_size)
    per_rank = -(-params // (tensor_parallel_size * pipeline_parallel_size))
    width = _BYTES[model.dtype]
    weights = per_rank * width
    gradients = per_rank * 4
    optimizer = per_rank * (8 + (4 if width < 4 else 0))
    reference = weights if reference_strategy == "model" else 0
    reference_host = weights if reference_strategy == "swap" else 0
    s = seq_length
    b = micro_batch_size * sequences_per_example
    h, a = model.hidden_size, model.num_attention_heads
    layers_per_stage = -(-model.num_layers // pipeline_parallel_size)
    per_layer_16bit = s * b * h * (34 + 5 * a * s / h)
    kept_16bit = _kept_activations(per_layer_16bit, s * b * h, layers_per_stage, parallel)
    activations = int(kept_16bit * width / 2 / tensor_parallel_size)
    return MemoryEstimate(
        parameters=per_rank,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        reference=reference,
        reference_host=reference_host,
        activations=activations,
    )


def _kept_activations(per_layer: float, sbh: int, layers: int, parallel: Any) -> float:
    """16-bit activation bytes one pipeline stage keeps at peak, given its recomputation."""
    granularity = getattr(parallel, "activations_checkpoint_granularity", None)
    if granularity is None:
        return per_layer * layers
    if granularity == "selective":
        return 34 * sbh * layers
    n = min(parallel.activations_checkpoint_num_layers, layers)
    if parallel.activations_checkpoint_method == "uniform":
        return 2 * sbh * -(-layers // n) + per_layer * n  # group inputs + one group recomputed
    return 2 * sbh * n + per_layer * (layers - n + 1)  # block: n inputs, the rest kept, one redone


@dataclass(frozen=True)
class DataPlan:
    """What the data holds after validation and tokenization.

    Attributes:
        train_examples: Training examples (pairs for DPO).
        val_examples: Held-out examples.
        train_sequences: Training sequences (two per DPO pair).
        train_tokens: Training tokens (over all sequences).
        max_length: The sequence-length limit applied.
        summary: align-data's preprocessing summary of the training files.
        sources: Human-readable description of where the data comes from.
    """

    train_examples: int
    val_examples: int
    train_sequences: int
    train_tokens: int
    max_length: int
    summary: Any
    sources: str


def _preprocess(files: list[str], run: Any, tokenizer: Any, tmp: Path, max_length: int) -> Any:
    from align_core.algorithms import get_algorithm
    from align_data import PreprocessConfig, TokenizeConfig, preprocess

    config = PreprocessConfig(
        kind=get_algorithm(run.algorithm).data_kind,
        format=run.data.format,  # type: ignore[arg-type]
        strict=run.data.strict,
        tokenize=TokenizeConfig(max_length=max_length, overlong=run.data.over_long),
        progress=False,
    )
    return preprocess(files, tokenizer, tmp, config).summary


def plan_data(run: Any, source: Any, files_key: str = "model.data.data_prefix") -> DataPlan:
    """Validate and tokenize the run's data (or the synthetic task) into a temporary directory.

    Args:
        run: align-core's run configuration.
        source: `model_source` of the run (architecture and tokenizer).
        files_key: The key that named the files (in the error for a missing one).

    Raises:
        align_data.DataError: The first malformed record (strict mode), as ``file:line: ...``.
    """
    tokenizer = source.tokenizer
    max_length = run.data.seq_length or source.model.seq_length
    with tempfile.TemporaryDirectory(prefix="align-dry-run-") as tmp:
        root = Path(tmp)
        if run.data.train_files:
            train_files = list(run.data.train_files)
            val_files = list(run.data.validation_files)
            sources = ", ".join(train_files)
        else:
            from align_core.algorithms import get_algorithm
            from align_data import write_synthetic_dataset

            synthetic = run.data.synthetic
            files = write_synthetic_dataset(
                root / "synthetic",
                seed=synthetic.seed,
                num_train=synthetic.num_train,
                num_eval=synthetic.num_validation,
            )
            train_name, eval_name = get_algorithm(run.algorithm).synthetic_splits
            train_files = [str(getattr(files, train_name))]
            val_files = [str(getattr(files, eval_name))]
            sources = (
                f"synthetic task (seed {synthetic.seed}, {synthetic.num_train} train / "
                f"{synthetic.num_validation} held-out prompts)"
            )
        for path in train_files + val_files:
            check_data_file(files_key, path)
        train = _preprocess(train_files, run, tokenizer, root / "train", max_length)
        val_examples = 0
        if val_files:
            val_examples = _preprocess(val_files, run, tokenizer, root / "val", max_length).examples
    return DataPlan(
        train_examples=train.examples,
        val_examples=val_examples,
        train_sequences=train.sequences,
        train_tokens=train.tokens,
        max_length=max_length,
        summary=train,
        sources=sources,
    )


def plan_nemo_kd_data(teacher: Any, seq_length: int) -> DataPlan:
    """The examples of NeMo-Aligner KD JSONL (a distillation run's own data when it has them).

    Args:
        teacher: align-kd's `TeacherSourceConfig` with ``nemo_jsonl``.
        seq_length: The student's sequence length (reported as the limit).

    Raises:
        UsageError: A missing file.
        align_data.DataError: A malformed line (file, line and field named).
    """
    from align_data import PreprocessSummary
    from align_kd.data import nemo_kd_examples

    key = "model.knowledge_distillation.teacher"
    splits = {
        "nemo_jsonl": teacher.nemo_jsonl,
        "nemo_jsonl_validation": teacher.nemo_jsonl_validation,
    }
    for name, paths in splits.items():
        for path in paths:
            check_data_file(f"{key}.{name}", path)
    train = nemo_kd_examples(list(teacher.nemo_jsonl))
    val = (
        nemo_kd_examples(list(teacher.nemo_jsonl_validation))
        if teacher.nemo_jsonl_validation
        else []
    )
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in train]
    summary = PreprocessSummary(
        kind="sft",
        records=len(train),
        examples=len(train),
        sequences=len(train),
        tokens=sum(lengths),
        max_length=max(lengths, default=0),
    )
    return DataPlan(
        train_examples=len(train),
        val_examples=len(val),
        train_sequences=len(train),
        train_tokens=sum(lengths),
        max_length=seq_length,
        summary=summary,
        sources=f"NeMo-Aligner KD JSONL: {', '.join(teacher.nemo_jsonl)}",
    )


def _mib(value: int) -> str:
    mib = value / 2**20
    return f"{mib / 1024:,.2f} GiB" if mib >= 1024 else f"{mib:,.1f} MiB"


def dry_run(prepared: Prepared, console: Console) -> int:
    """Print the plan of a prepared run; return 0 when everything checks out."""
    algorithm = prepared.composed.algorithm
    run = prepared.run
    view = core_view(algorithm, run)
    launch = prepared.launch
    parallel = run.parallel
    checked = preflight(prepared)
    source, dp, accumulation = checked.source, checked.data_parallel_size, checked.accumulation
    if algorithm == "kd" and run.teacher.nemo_jsonl:
        data = plan_nemo_kd_data(run.teacher, source.model.seq_length)
    else:
        spin = algorithm == "spin"
        files_key = "model.data.train_ds.file_path" if spin else "model.data.data_prefix"
        data = plan_data(view, source, files_key)
    val_batches = data.val_examples // run.data.global_batch_size
    steps, steps_text = _steps(algorithm, run, data, val_batches, launch.world_size)
    model = source.model
    reference = checked.reference
    from align_core.algorithms import get_algorithm

    sequences = get_algorithm(algorithm).sequences_per_example
    memory = estimate_memory(
        model,
        tensor_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_parallel_size=parallel.pipeline_model_parallel_size,
        micro_batch_size=run.data.micro_batch_size,
        seq_length=data.max_length,
        sequences_per_example=sequences,
        reference_strategy=reference,
        parallel=parallel,
    )
    tokens_per_example = data.train_tokens / max(1, data.train_examples)
    tokens_per_step = tokens_per_example * run.data.global_batch_size

    table = Table(title=f"plan: {algorithm} ({prepared.run_dir})", show_header=False)
    table.add_column("")
    table.add_column("")
    rows = [
        ("processes", f"{launch.world_size} ({launch.nnodes} node(s) × {launch.nproc_per_node})"),
        (
            "layout",
            f"TP={parallel.tensor_model_parallel_size} PP={parallel.pipeline_model_parallel_size}"
            f" CP={parallel.context_parallel_size} DP={dp}",
        ),
        (
            "batch",
            f"global {run.data.global_batch_size} = micro {run.data.micro_batch_size} × "
            f"accumulation {accumulation} × DP {dp}",
        ),
        ("data", data.sources),
        (
            "examples",
            f"{data.train_examples:,} train, {data.val_examples:,} held-out "
            f"(truncated {data.summary.truncated:,}, dropped "
            f"{data.summary.dropped:,}, "
            f"invalid {data.summary.skipped_invalid:,})",
        ),
        ("sequence length", f"≤ {data.max_length} tokens, mean {tokens_per_example:,.1f}/example"),
        ("steps", steps_text),
        (
            "tokens",
            f"≈ {tokens_per_step:,.0f} per step, ≈ {tokens_per_step * steps.max_steps:,.0f} total",
        ),
        (
            "validation",
            f"every {steps.val_check_interval} steps, {steps.val_batches} batches"
            if steps.val_check_interval
            else "off",
        ),
        ("checkpoints", f"every {steps.save_interval} steps" if steps.save_interval else "at end"),
        checked.reference_row,
        ("model", model_line(model, run.restore_from_path)),
        ("parameters", f"{count_parameters(model, parallel.tensor_model_parallel_size):,}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    mem = Table(title="memory per rank (estimate)")
    mem.add_column("")
    mem.add_column("bytes", justify="right")
    for name, value in (
        ("weights", memory.weights),
        ("gradients (fp32)", memory.gradients),
        ("optimizer (Adam)", memory.optimizer),
        ("reference (device)", memory.reference),
        ("activations (1 micro-batch, full length)", memory.activations),
        ("total on device", memory.device_total),
        ("reference (host, pinned)", memory.reference_host),
    ):
        mem.add_row(name, _mib(value))
    console.print(mem)
    console.print("dry run: configuration and data are valid; nothing was trained", highlight=False)
    return 0


def _steps(
    algorithm: str, run: Any, data: DataPlan, val_batches: int, world_size: int
) -> tuple[Any, str]:
    """The step accounting (align-core's own rule) and its description."""
    from align_core.trainer.planner import plan_run

    try:
        if algorithm == "spin":
            from align_core.trainer.spin import spin_steps

            # The iterations and the run's step accounting as SPIN's training derives them.
            iterations, steps = spin_steps(
                run.trainer,
                prompts=data.train_examples,
                global_batch_size=run.data.global_batch_size,
                val_batches=val_batches,
                train_on_previous_iteration=run.spin.train_on_previous_iteration,
            )
            total = steps.max_steps
            first = iterations[0] if iterations else None
            per = ", ".join(str(p.steps) for p in iterations)
            text = (
                f"{total:,} over {len(iterations)} iteration(s) ({per}); each generates "
                f"{data.train_examples:,} answers, then {run.trainer.max_epochs} epoch(s) of "
                f"{first.steps_per_epoch if first else 0:,} steps; β "
                # One β per iteration: a too short list fails here, not at that iteration.
                + ", ".join(f"{run.spin.beta(t):g}" for t in range(len(iterations)))
            )
            return steps, text
        # The planner training uses: the dry run cannot disagree with the run.
        steps = plan_run(
            run,
            world_size,
            algorithm=algorithm,
            train_samples=data.train_examples,
            val_samples=data.val_examples,
            reference_strategy="none",
        ).steps
    except ValueError as exc:
        raise UsageError(str(with_batch_hint(exc, run, world_size))) from exc
    text = (
        f"{steps.max_steps:,} ({steps.steps_per_epoch:,} per epoch × "
        f"{run.trainer.max_epochs} epoch(s), trainer max_steps {run.trainer.max_steps})"
    )
    return steps, text
