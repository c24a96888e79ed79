"""``align generate``: answer every prompt of a JSONL file with one model (`generate_jsonl`).

The tree is `align_cli.config.trees.generate_tree`: ``sampling_params.*``,
``length_params.*``, ``micro_batch_size``, ``seq_length``, ``seed``, ``add_bos``,
``chat_template`` (align-core's `GenerateConfig`), the parallel layout and architecture keys
under ``model.``, and ``trainer.devices``/``trainer.num_nodes``. One process generates here;
with several, torchrun workers read the configuration from a temporary directory next to the
output file, removed at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from rich.console import Console

from align_cli.config import compose, load_tree, to_run_config, to_yaml
from align_cli.config.restore import base_model_for
from align_cli.errors import UsageError
from align_cli.progress import make_console

if TYPE_CHECKING:
    from align_cli.commands.run import RunOptions
    from align_cli.config import Composed

__all__ = ["default_output", "execute_generate", "run_generate_worker"]

TREE = "generate"


def default_output(prompts_file: str) -> str:
    """``PROMPTS.completions.jsonl`` in the current directory."""
    return f"{Path(prompts_file).stem}.completions.jsonl"


def _compose(options: RunOptions, prompts_file: str, output_file: str | None) -> Composed:
    layers: list[Any] = []
    if options.config_file:
        layers.append(load_tree(TREE, options.config_file))
    given: dict[str, Any] = {"prompts_file": prompts_file}
    given["output_file"] = output_file or default_output(prompts_file)
    if options.restore:
        given["pretrained_checkpoint"] = {"restore_from_path": options.restore}
    layers.append(OmegaConf.create(given))
    return compose(TREE, list(options.overrides), base=layers)


def execute_generate(
    options: RunOptions,
    prompts_file: str,
    output_file: str | None = None,
    console: Console | None = None,
) -> int:
    """Run ``align generate``; return the exit status.

    Raises:
        ConfigError: A bad key or value.
        UsageError: A prompts file that does not exist.
    """
    from align_cli.commands.run import launch, launch_options
    from align_cli.launch import launcher

    console = console or make_console()
    composed = _compose(options, prompts_file, output_file)
    for note in composed.notes:
        console.print(f"note: {note}", highlight=False)
    if options.show_config:
        console.print(to_yaml(composed.config), highlight=False, markup=False)
        return 0
    tree = composed.tree
    if not Path(tree.prompts_file).is_file():
        raise UsageError(f"{tree.prompts_file}: no such file")
    how = launch_options(options, tree)
    if launcher() is not None or how.world_size == 1:
        # One process, or one rank of an outer torchrun/Slurm job (each composed the same tree).
        return run_generate_worker(None, composed, quiet=options.quiet, console=console)
    out = Path(tree.output_file).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.launch-", dir=out.parent))
    try:
        return launch(run_dir, composed, options, how, console)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_generate_worker(
    run_dir: Path | None,
    composed: Composed,
    *,
    quiet: bool = False,
    console: Console | None = None,
) -> int:
    """One rank of ``align generate``; global rank 0 prints what was written."""
    from align_cli.launch import world_rank
    from align_cli.worker import quiet_library_warnings
    from align_core.generation import generate_jsonl

    quiet_library_warnings()
    tree = composed.tree
    config = to_run_config(TREE, tree, str(run_dir or "."), base_model=base_model_for(tree))
    Path(config.output_file).parent.mkdir(parents=True, exist_ok=True)
    result = generate_jsonl(config)
    if world_rank() == 0 and not quiet:
        console = console or make_console()
        per_prompt = result.generated_tokens / max(result.prompts, 1)
        console.print(
            f"wrote {result.prompts:,} completions to {result.output_file} "
            f"({result.generated_tokens:,} tokens, {per_prompt:,.1f} per prompt, "
            f"{result.tokens_per_s:,.0f} tokens/s)",
            highlight=False,
            soft_wrap=True,
        )
    return 0
