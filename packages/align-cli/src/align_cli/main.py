"""Entry point of the ``align`` command (Typer).

Only Typer is imported here; each command imports what it needs when it runs, so ``align
--help`` stays fast (no torch, megatron, Hydra or matplotlib).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from importlib.metadata import version
from inspect import Parameter, signature
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

# The `align run` commands, their help lines and sections (importing it does not import torch).
from align_core.algorithms.registry import REGISTRY

if TYPE_CHECKING:
    from align_cli.commands.run import RunOptions

__all__ = ["app", "report_errors"]


def _plain_flags(params: list) -> list:
    """Flags take no value: show no ``<bool>`` type next to them in the help."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _argument_usage(param: TyperArgument) -> str:
    name = param.metavar or param.name.upper()
    if param.nargs != 1:
        name += "..."
    return name if param.required else f"[{name}]"


class _Command(TyperCommand):
    """A command with a usage line ``[OPTIONS] ARGS [KEY=VALUE]...`` and flags without a type.

    Typer's own help writes required arguments as ``{arg}`` and flags as ``<bool>``.
    """

    def get_params(self, ctx: typer.Context) -> list:  # type: ignore[override]
        return _plain_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:  # type: ignore[override]
        pieces = [self.options_metavar] if self.options_metavar else []
        pieces += [_argument_usage(p) for p in self.get_params(ctx) if isinstance(p, TyperArgument)]
        if self.context_settings.get("allow_extra_args"):
            pieces.append("[KEY=VALUE]...")
        return pieces


class _Group(TyperGroup):
    """A command group whose ``--help`` flag shows no ``<bool>`` type."""

    def get_params(self, ctx: typer.Context) -> list:  # type: ignore[override]
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    name="align",
    cls=_Group,
    no_args_is_help=True,
    help="Align and distil LLMs on megatron-core: DPO, IPO, RPO, KTO, SPIN, SFT, KD.",
    pretty_exceptions_enable=False,
    add_completion=False,
)
run_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Train a model. Overrides follow the command as key=value (NeMo-Aligner's names).",
)
data_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="Check, tokenize and describe data files."
)
ckpt_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Inspect and export checkpoints.")
app.add_typer(run_app, name="run")
app.add_typer(data_app, name="data")
kd_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="Knowledge distillation: the teacher pass."
)
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(kd_app, name="kd")

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def report_errors(fn: Callable[[], int], *, rank: int | None = None) -> int:
    """Run ``fn`` and turn expected failures into one line on stderr and an exit status.

    Bad configuration or data exits 2 with the key or the ``file:line: field:`` location; a
    non-finite loss exits 1 naming the step (see `align_cli.errors.expected_failure`). Other
    exceptions propagate with their traceback. ``ALIGN_DEBUG=1`` re-raises everything. Only
    ``rank`` 0 prints (default: this process's global rank under a launcher, else 0).
    """
    from align_cli.errors import expected_failure
    from align_cli.launch import world_rank

    if rank is None:
        rank = world_rank()
    debug = os.environ.get("ALIGN_DEBUG") == "1"
    try:
        return fn()
    except KeyboardInterrupt:
        if rank == 0:
            _print_error("interrupted")
        return 130
    except Exception as exc:
        expected = None if debug else expected_failure(exc)
        if expected is None:
            raise
        status, message = expected
        if rank == 0:
            _print_error(message)
        return status


def _exit(status: int) -> None:
    raise typer.Exit(status)


_RUN_EPILOG = (
    "Examples: align run {cmd} (demo: tiny model, synthetic data) | align run {cmd} "
    "--restore model.nemo model.data.data_prefix=train.jsonl trainer.{algo}.max_steps=100 "
    "model.optim.lr=5e-6 | align run {cmd} --resume | align run {cmd} --show-config"
)


_RUN_EPILOGS = {
    "spin": "Examples: align run spin (demo: tiny model, synthetic data) | align run spin "
    "--restore sft.nemo model.data.train_ds.file_path=train.jsonl "
    "model.data.validation_ds.file_path=val.jsonl trainer.spin.max_iterations=2 "
    "model.spin.ref_policy_kl_penalty=[0.1,0.05] | align run spin --resume",
    "kd": "Examples: align run kd --restore student.nemo model.data.data_prefix=train.jsonl "
    "model.knowledge_distillation.teacher.directory=topk/ "
    "model.knowledge_distillation.sft_loss_weight=0.4 | align run kd --restore student.nemo "
    "model.knowledge_distillation.teacher.restore_from_path=teacher.nemo (online) | "
    "align run kd --resume",
}


def _check_unknown_options(ctx: typer.Context) -> None:
    """Fail on a mistyped ``--option`` (extra arguments are otherwise taken as overrides)."""
    import difflib

    known = [opt for param in ctx.command.params for opt in param.opts if opt.startswith("-")]
    for arg in ctx.args:
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            match = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {match[0]}?" if match else ""
            _print_error(f"no such option: {name}{hint}")
            _exit(2)


_Restore = Annotated[
    str | None,
    typer.Option("--restore", help="Initial model (.nemo); sets pretrained_checkpoint."),
]
_Config = Annotated[str | None, typer.Option("--config", help="YAML file of configuration keys.")]
_ShowConfig = Annotated[
    bool, typer.Option("--show-config", help="Print the composed configuration and exit.")
]
_Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary table.")]
_NprocPerNode = Annotated[
    int | None, typer.Option("--nproc-per-node", help="Processes per node (torchrun).")
]
_Nnodes = Annotated[int | None, typer.Option("--nnodes", help="Nodes (torchrun).")]
_NodeRank = Annotated[int, typer.Option("--node-rank", help="This node's rank.")]
_MasterAddr = Annotated[str, typer.Option("--master-addr", help="Address of node 0.")]
_MasterPort = Annotated[
    int | None,
    typer.Option(
        "--master-port", help="Port on node 0 (default: a free port on one node, else 29500)."
    ),
]


def _keyword(name: str, annotation: object, default: object) -> Parameter:
    return Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# The options of every command that launches workers, as `RunOptions` fields.
_LAUNCH_OPTIONS = (
    _keyword("config_file", _Config, None),
    _keyword("show_config", _ShowConfig, False),
    _keyword("quiet", _Quiet, False),
    _keyword("nproc_per_node", _NprocPerNode, None),
    _keyword("nnodes", _Nnodes, None),
    _keyword("node_rank", _NodeRank, 0),
    _keyword("master_addr", _MasterAddr, "127.0.0.1"),
    _keyword("master_port", _MasterPort, None),
)


def _launch_options(fn: Callable[..., None]) -> Callable[..., None]:
    """Give a command the options of every launched command, after its own.

    Args:
        fn: The command; its last parameter ``launch`` receives those options as a dict
            keyed by `align_cli.commands.run.RunOptions` field.

    Returns:
        The command as Typer sees it: ``fn``'s parameters, less ``launch``, then the shared ones.
    """
    own = signature(fn, eval_str=True)
    params = [p for name, p in own.parameters.items() if name != "launch"]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> None:
        fn(launch={p.name: kwargs.pop(p.name) for p in _LAUNCH_OPTIONS}, **kwargs)

    typer_signature = own.replace(parameters=[*params, *_LAUNCH_OPTIONS])
    command.__signature__ = typer_signature  # type: ignore[attr-defined]
    return command


def _run_options(
    ctx: typer.Context, command: str, launch: dict[str, Any], **fields: Any
) -> RunOptions:
    """Check a launched command's extra arguments and gather what was typed.

    Args:
        ctx: The command's context; its extra arguments are the overrides.
        command: The `RunOptions` command name.
        launch: The shared options (see `_launch_options`).
        **fields: The command's own `RunOptions` fields.

    Returns:
        The options, with the overrides and the full command line.
    """
    _check_unknown_options(ctx)
    from align_cli.commands.run import RunOptions

    return RunOptions(
        command=command, overrides=tuple(ctx.args), argv=tuple(sys.argv), **launch, **fields
    )


def _register_run(command: str) -> None:
    spec = REGISTRY[command]

    @_launch_options
    def run_command(
        ctx: typer.Context,
        restore: _Restore = None,
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue the last run of this command.")
        ] = False,
        dry_run: Annotated[
            bool,
            typer.Option("--dry-run", help="Check config and data, print the plan, train nothing."),
        ] = False,
        *,
        launch: dict[str, Any],
    ) -> None:
        options = _run_options(
            ctx, command, launch, restore=restore, resume=resume, dry_run=dry_run
        )
        from align_cli.commands.run import execute

        _exit(report_errors(lambda: execute(options)))

    run_command.__doc__ = spec.help
    run_app.command(
        command,
        cls=_Command,
        context_settings=_EXTRA,
        help=spec.help,
        epilog=_RUN_EPILOGS.get(command, _RUN_EPILOG).format(cmd=command, algo=spec.section),
    )(run_command)


for _command in REGISTRY:
    _register_run(_command)


@kd_app.command(
    "teacher",
    cls=_Command,
    context_settings=_EXTRA,
    epilog="Example: align kd teacher --restore teacher.nemo "
    "model.data.data_prefix=train.jsonl top_k=100 output=topk/ (rerun to resume)",
)
@_launch_options
def kd_teacher(
    ctx: typer.Context,
    restore: Annotated[str | None, typer.Option("--restore", help="The teacher (.nemo).")] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Check teacher, data and layout, print the plan, compute nothing."
        ),
    ] = False,
    *,
    launch: dict[str, Any],
) -> None:
    """Write the teacher's top-k logits over the data as shards (output=DIR; rerun resumes)."""
    from align_cli.commands.kd import COMMAND, execute_teacher

    options = _run_options(ctx, COMMAND, launch, restore=restore, dry_run=dry_run)
    _exit(report_errors(lambda: execute_teacher(options)))


@app.command(
    "generate",
    cls=_Command,
    context_settings=_EXTRA,
    epilog="Example: align generate --restore model.nemo prompts.jsonl --out out.jsonl "
    "sampling_params.use_greedy=true length_params.max_length=128 micro_batch_size=16",
)
@_launch_options
def generate(
    ctx: typer.Context,
    prompts: Annotated[
        str,
        typer.Argument(metavar="PROMPTS.jsonl", help="JSONL prompts (prompt, input or messages)."),
    ],
    restore: Annotated[str | None, typer.Option("--restore", help="The model (.nemo).")] = None,
    out: Annotated[
        str | None,
        typer.Option("--out", help="Completions JSONL (default PROMPTS.completions.jsonl)."),
    ] = None,
    *,
    launch: dict[str, Any],
) -> None:
    """Answer every prompt of a JSONL file; write prompt/completion JSONL."""
    options = _run_options(ctx, "generate", launch, restore=restore)
    from align_cli.commands.generate import execute_generate

    _exit(report_errors(lambda: execute_generate(options, prompts, out)))


@app.callback()
def main() -> None:
    """Align and distil LLMs on megatron-core."""


@app.command("version", cls=_Command)
def show_version() -> None:
    """Print the installed version of every align package."""
    for dist in ("align-losses", "align-data", "align-core", "align-kd", "align-cli"):
        typer.echo(f"{dist} {version(dist)}")


@app.command("plot", cls=_Command)
def plot(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (with metrics.jsonl).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default RUN_DIR/plots).")
    ] = None,
) -> None:
    """Write PNG charts (loss, accuracy, reward margin, KL, lr) from a run's metrics.jsonl."""

    def work() -> int:
        from align_cli.errors import UsageError
        from align_cli.plot import plot_run

        try:
            written = plot_run(run_dir, out)
        except (FileNotFoundError, ImportError) as exc:
            raise UsageError(str(exc)) from exc
        if not written:
            raise UsageError(f"{run_dir}/metrics.jsonl has no metrics to plot")
        for path in written:
            typer.echo(str(path))
        return 0

    _exit(report_errors(work))


def _console() -> object:
    from align_cli.progress import make_console

    return make_console()


def _exit_with(work: Callable[..., int], *args: Any, **kwargs: Any) -> None:
    """Exit with the status of ``work(*args, **kwargs)`` given a console, failures reported."""
    _exit(report_errors(lambda: work(*args, console=_console(), **kwargs)))


_Files = Annotated[list[str], typer.Argument(help="JSONL or Parquet files.")]
_Kind = Annotated[
    str | None,
    typer.Option("--kind", help="preference, unpaired or sft (default: from the format)."),
]
_Format = Annotated[
    str | None, typer.Option("--format", help="Record format (default: detected per file).")
]
_Lenient = Annotated[
    bool, typer.Option("--lenient", help="Skip and count bad records instead of stopping.")
]
_Report = Annotated[
    str | None, typer.Option("--report", help="Write skipped records and reasons to this JSONL.")
]
_Tokenizer = Annotated[
    str,
    typer.Option(
        "--tokenizer", help="'byte', a .nemo, a tokenizer.json or a sentencepiece .model."
    ),
]
_MaxLength = Annotated[int | None, typer.Option("--max-length", help="Longest sequence in tokens.")]


@data_app.command("validate", cls=_Command)
def data_validate(
    files: _Files,
    kind: _Kind = None,
    fmt: _Format = None,
    lenient: _Lenient = False,
    report: _Report = None,
) -> None:
    """Check every record; the first bad one is reported as file:line: field: reason."""
    from align_cli.commands.data import validate

    _exit_with(validate, files, kind=kind, fmt=fmt, lenient=lenient, report=report)


@data_app.command("preprocess", cls=_Command)
def data_preprocess(
    files: _Files,
    out: Annotated[str, typer.Option("--out", help="Dataset cache directory.")],
    tokenizer: _Tokenizer = "byte",
    kind: _Kind = None,
    fmt: _Format = None,
    lenient: _Lenient = False,
    max_length: _MaxLength = None,
    overlong: Annotated[
        str | None, typer.Option("--overlong", help="truncate or drop over-long examples.")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes.")] = 1,
    report: _Report = None,
) -> None:
    """Tokenize into memory-mapped shards (fingerprinted: an unchanged rerun reuses them)."""
    from align_cli.commands.data import preprocess_files

    _exit_with(
        preprocess_files,
        files,
        out=out,
        tokenizer=tokenizer,
        kind=kind,
        fmt=fmt,
        lenient=lenient,
        max_length=max_length,
        overlong=overlong,
        workers=workers,
        report=report,
    )


@data_app.command("stats", cls=_Command)
def data_stats(
    files: Annotated[
        list[str], typer.Argument(help="Data files, or a directory from `align data preprocess`.")
    ],
    tokenizer: _Tokenizer = "byte",
    kind: _Kind = None,
    fmt: _Format = None,
    max_length: _MaxLength = None,
    lenient: _Lenient = False,
) -> None:
    """Records, tokens, length histogram, truncated and dropped counts."""
    from align_cli.commands.data import stats

    _exit_with(
        stats,
        files,
        tokenizer=tokenizer,
        kind=kind,
        fmt=fmt,
        max_length=max_length,
        lenient=lenient,
    )


@ckpt_app.command("inspect", cls=_Command)
def ckpt_inspect(
    path: Annotated[
        str,
        typer.Argument(
            help="A .nemo, a Hugging Face directory, a run directory or a step_* checkpoint."
        ),
    ],
) -> None:
    """Describe a checkpoint: architecture, parameters, weights layout, tokenizer."""
    from align_cli.commands.ckpt import inspect

    _exit_with(inspect, path)


@ckpt_app.command("export", cls=_Command)
def ckpt_export(
    src: Annotated[
        str,
        typer.Argument(
            help="A run directory (newest step, or --step), a step_* checkpoint, a .nemo or a "
            "Hugging Face directory."
        ),
    ],
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="Destination (.nemo file, or directory for hf; default RUN_DIR/step_N.nemo "
            "or RUN_DIR/step_N_hf for a run).",
        ),
    ] = None,
    step: Annotated[
        int | None, typer.Option("--step", help="Checkpoint step (default: the newest).")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="nemo (NeMo 1.x archive) or hf (Hugging Face).")
    ] = "nemo",
) -> None:
    """Export a checkpoint to .nemo or a Hugging Face directory (LoRA merged), in one process."""
    from align_cli.commands.export import export

    _exit_with(export, src, out, step, fmt)


@app.command("init-model", cls=_Command)
def init_model(
    out: Annotated[str, typer.Argument(help="Destination .nemo file.")],
    num_layers: Annotated[int | None, typer.Option("--num-layers")] = None,
    hidden_size: Annotated[int | None, typer.Option("--hidden-size")] = None,
    ffn_hidden_size: Annotated[int | None, typer.Option("--ffn-hidden-size")] = None,
    num_attention_heads: Annotated[int | None, typer.Option("--num-attention-heads")] = None,
    num_query_groups: Annotated[int | None, typer.Option("--num-query-groups")] = None,
    vocab_size: Annotated[int | None, typer.Option("--vocab-size", help="At least 257.")] = None,
    seq_length: Annotated[int | None, typer.Option("--seq-length")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights.")] = 0,
) -> None:
    """Write a small random-initialised .nemo with a byte-level BPE tokenizer."""
    from align_cli.commands.ckpt import init_model as write

    given = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "ffn_hidden_size": ffn_hidden_size,
        "num_attention_heads": num_attention_heads,
        "num_query_groups": num_query_groups,
        "vocab_size": vocab_size,
        "seq_length": seq_length,
    }
    changes = {k: v for k, v in given.items() if v is not None}
    _exit_with(write, out, changes, seed)
