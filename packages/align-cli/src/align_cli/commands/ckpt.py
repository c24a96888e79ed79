"""``align ckpt inspect`` and ``align init-model``: look into checkpoints, make tiny ones.

``inspect`` reads a ``.nemo`` (file or extracted directory) or a Hugging Face directory through
align-core's readers, or a run directory / training checkpoint written by ``align run``; it
never builds a model.
``init-model`` writes a small random-initialised ``.nemo`` with its tokenizer through
align-core's tiny writer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from align_cli.errors import UsageError
from align_cli.plan import count_parameters

__all__ = ["TINY_VOCAB_SIZE", "init_model", "inspect"]

TINY_VOCAB_SIZE = 320
"""Vocabulary of ``align init-model`` when none is given: the byte-level BPE tokenizer that the
tiny writer builds needs at least 257 tokens (256 bytes and the end-of-text token)."""


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mib(value: int) -> str:
    return f"{value / 2**20:,.1f} MiB"


def _weights_line(ckpt: Any) -> str:
    """Where a pretrained checkpoint keeps its weights."""
    weights = getattr(ckpt, "weights", None)
    if weights is not None:  # a .nemo
        return (
            f"{weights.kind} (saved with TP={weights.tensor_parallel}, "
            f"PP={weights.pipeline_parallel})"
        )
    files = sorted({Path(f).name for f in ckpt.weight_files})
    return f"safetensors, {str(ckpt.torch_dtype).removeprefix('torch.')} ({', '.join(files)})"


def _inspect_pretrained(path: Path, console: Console) -> int:
    from align_core.pretrained import checkpoint_format, open_pretrained

    kind = "Hugging Face" if checkpoint_format(path) == "hf" else ".nemo"
    with open_pretrained(path) as ckpt:
        model = ckpt.model_config
        table = Table(title=f"{path} ({kind}, {_mib(_size(path))})", show_header=False)
        table.add_column("")
        table.add_column("")
        architecture = getattr(ckpt, "config", {}).get("architectures")
        if kind == "Hugging Face" and architecture:
            table.add_row("architecture", ", ".join(map(str, architecture)))
        for field in dataclasses.fields(model):
            table.add_row(field.name, str(getattr(model, field.name)))
        table.add_row("parameters", f"{count_parameters(model):,}")
        table.add_row("weights", _weights_line(ckpt))
        spec = ckpt.tokenizer
        if spec is None:
            table.add_row("tokenizer", "none")
        else:
            files = ", ".join(f"{k}={v.name}" for k, v in spec.files().items())
            kind = f"{spec.library}" + (f"/{spec.type}" if spec.type else "")
            table.add_row("tokenizer", f"{kind} ({files})" if files else kind)
        console.print(table)
    return 0


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob("step_*") if p.is_dir() and "tmp." not in p.name)


def _inspect_run(run_dir: Path, console: Console) -> int:
    from align_cli.rundir import SUMMARY_FILE, read_run_info

    info = read_run_info(run_dir)
    table = Table(title=f"run {run_dir}", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("command", f"align run {info.command}")
    table.add_row("created", info.created)
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        result = json.loads(summary_path.read_text()).get("result", {})
        table.add_row("ended", str(result.get("stop_reason")))
        table.add_row("steps", str(result.get("steps")))
        for name in ("loss", "acc"):
            value = result.get("last_val_metrics", {}).get(name)
            if value is not None:
                table.add_row(f"val {name}", f"{value:.4f}")
    checkpoints = _checkpoint_dirs(run_dir)
    for ckpt in checkpoints:
        table.add_row("checkpoint", f"{ckpt.relative_to(run_dir)} ({_mib(_size(ckpt))})")
    if not checkpoints:
        table.add_row("checkpoint", "none")
    for nemo in sorted(run_dir.glob("*.nemo")):
        table.add_row("model", f"{nemo.name} ({_mib(_size(nemo))})")
    console.print(table)
    return 0


def _inspect_step(path: Path, console: Console) -> int:
    table = Table(title=f"checkpoint {path}", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("size", _mib(_size(path)))
    table.add_row("files", str(sum(1 for p in path.rglob("*") if p.is_file())))
    console.print(table)
    return 0


def inspect(path: str, console: Console) -> int:
    """Describe a ``.nemo``, a Hugging Face directory, a run directory or a training checkpoint."""
    target = Path(path)
    if not target.exists():
        raise UsageError(f"{path}: no such file or directory")
    if target.is_dir() and (target / "run.json").is_file():
        return _inspect_run(target, console)
    if (
        target.suffix == ".nemo"
        or (target / "model_config.yaml").is_file()
        or (target / "config.json").is_file()
    ):
        return _inspect_pretrained(target, console)
    if target.is_dir() and target.name.startswith("step_"):
        return _inspect_step(target, console)
    raise UsageError(
        f"{path}: not a .nemo, a Hugging Face directory (config.json), a run directory or a "
        "step_* checkpoint"
    )


def init_model(out: str, changes: dict[str, Any], seed: int, console: Console) -> int:
    """Write a random-initialised ``.nemo`` with a byte-level BPE tokenizer.

    Args:
        out: Destination file.
        changes: `ModelConfig` fields to set (others keep their defaults).
        seed: Seed of the weights.
        console: Where to report.
    """
    from align_core.config import ModelConfig
    from align_core.nemo import write_tiny_nemo

    changes = {"vocab_size": TINY_VOCAB_SIZE, **changes}
    try:
        model = ModelConfig(**changes)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    path = write_tiny_nemo(out, model, seed=seed)
    console.print(
        f"wrote {path} ({count_parameters(model):,} parameters, {model.num_layers} layers, "
        f"hidden {model.hidden_size}, vocab {model.vocab_size})",
        highlight=False,
    )
    return 0
