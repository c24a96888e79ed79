"""``align kd teacher``: the teacher's top-k over a run's data, written as shards (resumable).

The tree is `align_cli.config.trees.kd_teacher_tree` (``output``, ``top_k``, ``dtype``, ...,
``model.data.*`` as in the student's ``align run kd``). The output directory is the "run
directory": it holds ``config.yaml`` and ``run.json`` (what torchrun workers read) next to the
``train/`` and ``validation/`` stores. Running the same command again continues every part of
the stores where it stopped and computes nothing when they are complete. ``--dry-run`` checks the
teacher, the data and the layout and prints the plan: examples and tokens per split, what a
rerun would continue, and the expected store size.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from rich.console import Console

from align_cli.config import compose, load_tree, to_run_config, to_yaml
from align_cli.errors import UsageError
from align_cli.progress import make_console

if TYPE_CHECKING:
    from align_cli.commands.run import RunOptions
    from align_cli.config import Composed

__all__ = [
    "StoreStats",
    "check_teacher",
    "execute_teacher",
    "plan_teacher",
    "run_teacher_worker",
    "store_bytes_per_token",
    "store_stats",
]

TREE = "kd_teacher"
COMMAND = "kd-teacher"


@dataclass(frozen=True)
class StoreStats:
    """What a teacher store directory holds on disk.

    Attributes:
        samples: Committed samples (all parts).
        positions: Input positions (tokens) of those samples.
        bytes: Size of every file under the directory.
    """

    samples: int
    positions: int
    bytes: int

    @property
    def bytes_per_token(self) -> float:
        """``bytes / positions``."""
        return self.bytes / max(self.positions, 1)


def store_stats(directory: Path) -> StoreStats:
    """Samples, positions and bytes of the stores under ``directory`` (all its parts).

    The positions come from each store's ``index.bin`` (align-data's commit log: one int64
    triple ``(shard, first_position, num_positions)`` per committed sample).
    """
    samples = positions = 0
    for index in directory.rglob("index.bin"):
        data = index.read_bytes()
        entries = array("q")  # int64 in the machine's byte order, as align-data writes them
        entries.frombytes(data[: len(data) // 24 * 24])  # committed entries only
        samples += len(entries) // 3
        positions += sum(entries[2::3])
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return StoreStats(samples, positions, size)


def _compose(options: RunOptions) -> Composed:
    layers: list[Any] = []
    if options.config_file:
        layers.append(load_tree(TREE, options.config_file))
    if options.restore:
        layers.append(
            OmegaConf.create({"pretrained_checkpoint": {"restore_from_path": options.restore}})
        )
    return compose(TREE, list(options.overrides), base=layers)


def execute_teacher(options: RunOptions, console: Console | None = None) -> int:
    """Run ``align kd teacher``; return the exit status.

    Raises:
        ConfigError: A bad key or value, or no teacher (``--restore``).
        UsageError: No ``output=DIR``.
    """
    from align_cli.commands.run import launch, launch_options

    console = console or make_console()
    composed = _compose(options)
    for note in composed.notes:
        console.print(f"note: {note}", highlight=False)
    if options.show_config:
        console.print(to_yaml(composed.config), highlight=False, markup=False)
        return 0
    if composed.tree.output is None:
        raise UsageError(
            "output=DIR is required: the directory of the teacher stores (a rerun resumes it)"
        )
    out = Path(composed.tree.output)
    config = to_run_config(TREE, composed.tree, str(out))  # every value checked before starting
    how = launch_options(options, composed.tree)
    if options.dry_run:
        return plan_teacher(config, how, console)
    check_teacher(config, how)  # before any worker starts or anything is written
    return launch(out, composed, options, how, console)


def run_teacher_worker(
    out: Path, composed: Composed, *, quiet: bool = False, console: Console | None = None
) -> int:
    """One rank of the teacher pass; global rank 0 prints what was written."""
    from align_cli.launch import world_rank
    from align_cli.worker import quiet_library_warnings
    from align_kd import run_teacher

    quiet_library_warnings()
    config = to_run_config(TREE, composed.tree, str(out))
    results = run_teacher(config)
    if world_rank() != 0 or quiet:
        return 0
    console = console or make_console()
    for split, result in results.items():
        stats = store_stats(out / split)
        done = (
            f"computed {result.samples_computed:,} samples ({result.positions_computed:,} "
            f"tokens, {result.positions_per_second:,.0f} tokens/s)"
            if result.samples_computed
            else "already complete, nothing computed"
        )
        console.print(
            f"{split}: {result.num_examples:,} examples; {done}; store {stats.samples:,} samples, "
            f"{stats.positions:,} tokens, {_size(stats.bytes)} = "
            f"{stats.bytes_per_token:,.0f} bytes/token",
            highlight=False,
            soft_wrap=True,  # one line per split, also in logs
        )
    console.print(f"teacher top-k (k={config.output.top_k}): {out}", highlight=False)
    return 0


def store_bytes_per_token(top_k: int, dtype: str, vocab_size: int, *, keep_input_ids: bool) -> int:
    """Bytes one input position takes in an align-data teacher store (index excluded).

    ``top_k`` logits in ``dtype`` and their ids (16 bits when the vocabulary fits, else 32),
    the float32 log-sum-exp, and the int32 input id when ``keep_input_ids``.
    """
    logit = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    ids = 2 if vocab_size <= 1 << 16 else 4
    return top_k * (logit + ids) + 4 + (4 if keep_input_ids else 0)


def check_teacher(config: Any, how: Any) -> tuple[Any, Any]:
    """The checks of ``--dry-run`` that need no pass over the data, made before launching.

    Returns:
        The SFT view of the pass (align-core's `RunConfig`) and its `model_source`.

    Raises:
        UsageError: A layout the processes cannot hold, or a missing teacher, data file or
            ``tokenizer_from``.
    """
    from align_cli.preflight import check_data_files, data_parallel_size, model_source
    from align_core.trainer import RunConfig

    view = RunConfig(
        algorithm="sft",
        run_dir=config.output.output_dir,
        parallel=config.parallel,
        data=config.data,
        restore_from_path=config.restore_from_path,
        seed=config.seed,
    )
    data_parallel_size(view, how.world_size)
    source = model_source(view)
    check_data_files("sft", view)
    if config.tokenizer_from is not None and not Path(config.tokenizer_from).exists():
        raise UsageError(f"tokenizer_from: {config.tokenizer_from}: no such file")
    return view, source


def plan_teacher(config: Any, how: Any, console: Console) -> int:
    """``align kd teacher --dry-run``: check everything and print the plan; compute nothing.

    Args:
        config: align-kd's `KDTeacherRunConfig`.
        how: The launch (`align_cli.launch.LaunchOptions`).
        console: Where the plan is printed.

    Raises:
        UsageError: A layout the processes cannot hold, a missing file, or an output directory
            that holds a pass over another number of examples.
    """
    from rich.table import Table

    from align_cli.plan import count_parameters, model_line, plan_data
    from align_cli.preflight import data_parallel_size

    parallel = config.parallel
    view, source = check_teacher(config, how)
    teacher_vocab = int(source.tokenizer.vocab_size)  # what the stores record
    tokenizer_line = f"the teacher's ({teacher_vocab:,} tokens)"
    if config.tokenizer_from is not None:
        import dataclasses

        from align_core.pretrained import open_pretrained
        from align_core.trainer.build import tokenizer_from_spec

        with open_pretrained(config.tokenizer_from) as ckpt:
            tokenizer = tokenizer_from_spec(ckpt.tokenizer)
        source = dataclasses.replace(source, tokenizer=tokenizer)
        tokenizer_line = f"{config.tokenizer_from} ({tokenizer.vocab_size:,} tokens)"
    data = plan_data(view, source)
    out = Path(config.output.output_dir)
    examples = {"train": data.train_examples}
    if data.val_examples:
        examples["validation"] = data.val_examples
    per_token = store_bytes_per_token(
        config.output.top_k,
        config.output.dtype,
        teacher_vocab,
        keep_input_ids=config.output.keep_input_ids,
    )
    states = [_resume_state(out, split, count) for split, count in examples.items()]
    dp = data_parallel_size(view, how.world_size)
    table = Table(title=f"plan: teacher top-k ({out})", show_header=False)
    table.add_column("")
    table.add_column("")
    for name, value in (
        ("processes", f"{how.world_size} ({how.nnodes} node(s) × {how.nproc_per_node})"),
        (
            "layout",
            f"TP={parallel.tensor_model_parallel_size} PP={parallel.pipeline_model_parallel_size}"
            f" CP={parallel.context_parallel_size} DP={dp}",
        ),
        ("teacher", model_line(source.model, config.restore_from_path)),
        ("parameters", f"{count_parameters(source.model, parallel.tensor_model_parallel_size):,}"),
        ("tokenizer", tokenizer_line),
        ("data", data.sources),
        (
            "examples",
            f"{data.train_examples:,} train, {data.val_examples:,} held-out "
            f"(≤ {data.max_length} tokens; {data.train_tokens:,} train tokens)",
        ),
        (
            "top-k",
            f"k={config.output.top_k}, {config.output.dtype} logits, micro-batch "
            f"{config.output.micro_batch_size}",
        ),
        ("output", f"{out} ({'; '.join(states)})"),
        (
            "store (estimate)",
            f"{per_token:,} bytes/token, ≈ {_size(per_token * data.train_tokens)} for train",
        ),
    ):
        table.add_row(name, value)
    console.print(table)
    console.print(
        "dry run: configuration and data are valid; nothing was computed", highlight=False
    )
    return 0


def _resume_state(out: Path, split: str, examples: int) -> str:
    """What a run would do with ``out/split``: start it, continue it, or nothing."""
    import json

    plan_file = out / split / "plan.json"
    if not plan_file.is_file():
        return f"{split}: new"
    stored = json.loads(plan_file.read_text())["num_examples"]
    if stored != examples:
        raise UsageError(
            f"output={out}: {split}/ holds a teacher pass over {stored:,} examples, this data "
            f"has {examples:,}; use another output directory"
        )
    done = store_stats(out / split).samples
    return f"{split}: complete" if done == stored else f"{split}: {done:,} of {stored:,} done"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"
