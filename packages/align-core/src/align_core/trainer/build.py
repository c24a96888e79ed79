"""Building a run's pieces from its `RunConfig`: tokenizer, model, data, algorithm, reference.

Every function here is collective-safe: rank 0 does the file work (preprocessing caches, the
synthetic task files, the reference cache) and the others wait at a barrier; an error on rank 0
is sent to every rank and raised everywhere, so a bad data file stops all ranks with the same
``file:line: field: reason`` message instead of leaving the others waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from align_core.algorithms.contract import AlgorithmStep
from align_core.algorithms.registry import AlgorithmSpec, get_algorithm
from align_core.config import ModelConfig, ParallelConfig

if TYPE_CHECKING:
    from align_core.nemo import TokenizerSpec
    from align_core.trainer.run import RunConfig
    from align_data import TokenizedDataset, Tokenizer

__all__ = [
    "Datasets",
    "ModelSource",
    "algorithm_config",
    "build_algorithm",
    "forward_merge",
    "load_datasets",
    "needs_reference",
    "on_main_then_all",
    "reference_merge",
    "resolve_model_source",
    "tokenizer_from_spec",
]

T = TypeVar("T")


def on_main_then_all(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first, then on the other ranks; errors reach every rank.

    ``fn`` must be safe to run again once rank 0 has run it (it reuses what rank 0 wrote).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    result: T | None = None
    error: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:
            error[0] = f"{type(exc).__name__}: {exc}"
            dist.broadcast_object_list(error, src=0)
            raise
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"rank 0 failed: {error[0]}")
    if dist.get_rank() != 0:
        result = fn()
    dist.barrier()
    return result  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ model


def tokenizer_from_spec(spec: TokenizerSpec | None) -> Tokenizer:
    """The align-data tokenizer a `.nemo` tokenizer description names (None: byte tokenizer).

    Call it while the archive is open (the artifact files are read here); see
    `align_core.nemo.build_tokenizer`.
    """
    from align_core.nemo import build_tokenizer

    return build_tokenizer(spec)


@dataclass(frozen=True)
class ModelSource:
    """Where the initial policy comes from.

    Attributes:
        model: The architecture to build.
        tokenizer: The tokenizer.
        tokenizer_spec: The `.nemo` tokenizer description (for export), or None. Read from a
            restored `.nemo`, it holds its artifact bytes (`TokenizerSpec.detached`), so it can
            be exported after the archive's temporary extraction is gone.
        nemo_path: The checkpoint to load weights from — a `.nemo` or a Hugging Face
            directory (`align_core.pretrained`) — or None for a fresh initialisation.
    """

    model: ModelConfig
    tokenizer: Any
    tokenizer_spec: Any
    nemo_path: str | None

    @property
    def checkpoint_format(self) -> str | None:
        """``"nemo"`` or ``"hf"`` for a restored model, None for a fresh one."""
        from align_core.pretrained import checkpoint_format

        return None if self.nemo_path is None else checkpoint_format(self.nemo_path)


def resolve_model_source(run: RunConfig) -> ModelSource:
    """Architecture and tokenizer: from ``restore_from_path``, or fresh (byte tokenizer).

    ``restore_from_path`` may be a `.nemo` or a Hugging Face directory.

    Raises:
        ValueError: A fresh model whose vocabulary is smaller than the tokenizer's.
    """
    from align_core.nemo import TokenizerSpec
    from align_core.pretrained import open_pretrained

    tp = run.parallel.tensor_model_parallel_size
    if run.restore_from_path is not None:
        with open_pretrained(run.restore_from_path) as ckpt:
            model = run.model if run.model is not None else ckpt.model_config_for(tp)
            spec = ckpt.tokenizer
            tokenizer = tokenizer_from_spec(spec)  # reads the artifacts while extracted
            # The extraction is removed when the block ends: keep the artifact bytes, which
            # the final .nemo export writes again.
            spec = None if spec is None else spec.detached()
        return ModelSource(model, tokenizer, spec, run.restore_from_path)
    from align_data import ByteTokenizer

    tokenizer = ByteTokenizer()
    model = run.model if run.model is not None else ModelConfig(vocab_size=tokenizer.vocab_size)
    if model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size {model.vocab_size} is smaller than the byte tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    return ModelSource(model, tokenizer, TokenizerSpec(library="byte-level"), None)


def build_policy(source: ModelSource, parallel: ParallelConfig) -> torch.nn.Module:
    """This rank's model chunk holding the initial weights (from the checkpoint, or fresh)."""
    from align_core.model import build_gpt_model
    from align_core.pretrained import load_pretrained_weights, open_pretrained

    model = build_gpt_model(source.model, parallel)
    if source.nemo_path is not None:
        with open_pretrained(source.nemo_path) as ckpt:
            load_pretrained_weights(model, ckpt)
    return model


# ------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Datasets:
    """Tokenized training and validation data.

    Attributes:
        train: Training examples (random access, ``index`` = position).
        val: Validation examples (may be empty).
        fingerprint: Hash of sources, tokenizer and settings of both splits.
        summary: Human-readable preprocessing summary of the training data.
    """

    train: Sequence[Any]
    val: Sequence[Any]
    fingerprint: str
    summary: str


def _files(
    run: RunConfig, data_dir: Path, status: Callable[[str], None] | None = None
) -> tuple[list[str], list[str]]:
    if run.data.train_files:
        return list(run.data.train_files), list(run.data.validation_files)
    from align_data import write_synthetic_dataset

    syn = run.data.synthetic
    out = data_dir / f"synthetic-{syn.seed}-{syn.num_train}-{syn.num_validation}"

    def write() -> Any:
        if not (out / "done").exists():
            if status is not None:
                status(
                    f"building the synthetic data ({syn.num_train} train / "
                    f"{syn.num_validation} held-out prompts)"
                )
            write_synthetic_dataset(
                out, seed=syn.seed, num_train=syn.num_train, num_eval=syn.num_validation
            )
            (out / "done").write_text("ok\n")
        return None

    on_main_then_all(write)
    train_name, eval_name = get_algorithm(run.algorithm).synthetic_splits
    return [str(out / f"{train_name}.jsonl")], [str(out / f"{eval_name}.jsonl")]


def load_datasets(
    run: RunConfig,
    tokenizer: Tokenizer,
    seq_length: int,
    *,
    status: Callable[[str], None] | None = None,
) -> Datasets:
    """Validate and tokenize the run's data (cached under ``run_dir/data``).

    ``status`` (rank 0) is told before a slow phase starts (building the synthetic data), and
    how many examples of each split were truncated (prompt or response cut), dropped (and why)
    or skipped as invalid, when any were. Dropped and skipped records are listed with their
    reasons in ``run_dir/data/skipped.jsonl`` (``skipped-validation.jsonl`` for held-out data).

    Raises:
        align_data.DataError: The first malformed record (strict mode), naming file and line;
            a data path that is not a readable regular file.
        ValueError: The examples left after dropping over-long ones do not fill one global
            batch (the message says how many were dropped and why).
    """
    from dataclasses import replace

    from align_data import PreprocessConfig, TokenizeConfig, preprocess

    data_dir = Path(run.run_dir) / "data"
    train_files, val_files = _files(run, data_dir, status)
    main = not dist.is_initialized() or dist.get_rank() == 0
    config = PreprocessConfig(
        kind=get_algorithm(run.algorithm).data_kind,
        format=run.data.format,  # type: ignore[arg-type]
        strict=run.data.strict,
        tokenize=TokenizeConfig(max_length=seq_length + 1, overlong=run.data.over_long),
        progress=False,
    )
    reports = {
        "training": data_dir / "skipped.jsonl",
        "validation": data_dir / "skipped-validation.jsonl",
    }

    def prepare(paths: list[str], split: str) -> TokenizedDataset:
        # Rank 0 alone writes the list, so that no two ranks copy it at once.
        split_config = replace(config, report_path=str(reports[split]) if main else None)
        return on_main_then_all(
            lambda: preprocess(paths, tokenizer, data_dir / "cache", split_config)
        )

    train = prepare(train_files, "training")
    val = prepare(val_files, "validation") if val_files else None
    if main and status is not None:
        splits = [("training", train)] + ([("validation", val)] if val is not None else [])
        for name, dataset in splits:
            line = dataset.summary.length_line(f"seq_length {seq_length}")
            if line is not None:
                status(f"{name} data: {line} (listed in {reports[name]})")
    shown = train.summary
    if shown.dropped and len(train) < run.data.global_batch_size:
        raise ValueError(
            f"{len(train)} training examples do not fill one global batch of "
            f"{run.data.global_batch_size} (model.global_batch_size): {shown.dropped} of "
            f"{shown.records} were dropped as over-long for seq_length {seq_length} "
            f"({shown.drop_counts()}; model.data.over_long={run.data.over_long})"
        )
    fingerprint = train.fingerprint + ":" + (val.fingerprint if val is not None else "-")
    return Datasets(
        train, val if val is not None else [], fingerprint, train.summary.format() if main else ""
    )


# -------------------------------------------------------------------------------- algorithm


def algorithm_config(run: RunConfig) -> Any:
    """The settings of ``run.algorithm`` (``run.dpo``, ``run.kto`` or ``run.sft``)."""
    return getattr(run, get_algorithm(run.algorithm).section)


def build_algorithm(run: RunConfig, data_group: dist.ProcessGroup | None) -> AlgorithmStep:
    """The algorithm step of ``run.algorithm`` (KTO and SFT reduce over ``data_group``)."""
    spec = get_algorithm(run.algorithm)
    if not spec.shared_loop:
        raise ValueError(f"unknown algorithm {run.algorithm!r}")
    return spec.build_step(algorithm_config(run), data_group)


def needs_reference(run: RunConfig) -> bool:
    """Whether ``run`` needs reference log-probs (its algorithm's registry entry decides)."""
    return get_algorithm(run.algorithm).needs_reference(algorithm_config(run))


def forward_merge(
    algorithm: str, size: int | None, *, micro_batch_size: int, accumulation: int | None = None
) -> int:
    """Training micro-batches per reference forward, from ``log_prob_forward_micro_batch_size``.

    Args:
        algorithm: The registry name (its ``reference_unit``: sequences per example in one
            reference row count, 0 without a reference).
        size: ``model.<section>.log_prob_forward_micro_batch_size``; None: 1.
        micro_batch_size: Examples per training micro-batch.
        accumulation: Training micro-batches per step on a rank; None skips that check.

    Raises:
        ValueError: ``size`` is not a whole number of training micro-batches, or they do not
            divide a step's micro-batches (every reference forward must have the same shape).
    """
    spec: AlgorithmSpec = get_algorithm(algorithm)
    if not spec.reference_unit or size is None:
        return 1
    key = f"model.{spec.section}.log_prob_forward_micro_batch_size"
    unit = spec.reference_unit * micro_batch_size
    if size % unit:
        raise ValueError(f"{key} {size} must be a multiple of {unit} (one training micro-batch)")
    merge = size // unit
    if accumulation is not None and accumulation % merge:
        raise ValueError(
            f"{key} {size} covers {merge} training micro-batches, which does not divide the "
            f"{accumulation} micro-batches of a step"
        )
    return merge


def reference_merge(run: RunConfig, accumulation: int | None = None) -> int:
    """`forward_merge` of a shared-loop run (``accumulation``: micro-batches per step)."""
    has_reference = get_algorithm(run.algorithm).reference_unit > 0
    size = algorithm_config(run).log_prob_forward_micro_batch_size if has_reference else None
    return forward_merge(
        run.algorithm,
        size,
        micro_batch_size=run.data.micro_batch_size,
        accumulation=accumulation,
    )
