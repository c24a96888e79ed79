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
        _title(console, f"{path} ({kind}, {_mib(_size(path))})")
        table = Table(show_header=False)
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
    _title(console, f"run {run_dir}")
    table = Table(show_header=False)
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


def _title(console: Console, text: str) -> None:
    """A table's title on its own line, never wrapped (paths have no spaces to wrap at)."""
    console.print(f"[bold]{text}[/]", highlight=False, soft_wrap=True)


def _architecture(model: dict[str, Any]) -> str:
    """``2 layers, hidden size 64, 4 heads, vocab 320, seq 128`` from a saved model config."""
    parts = []
    for key, form in (
        ("num_layers", "{} layers"),
        ("hidden_size", "hidden size {}"),
        ("num_attention_heads", "{} heads"),
        ("vocab_size", "vocab {}"),
        ("seq_length", "seq {}"),
    ):
        if model.get(key) is not None:
            parts.append(form.format(model[key]))
    return ", ".join(parts) or "not recorded"


def _run_config(path: Path) -> Path | None:
    """``RUN_DIR/config.yaml`` of ``RUN_DIR/checkpoints/step_*``, when there."""
    for parent in path.parents:
        if (parent / "config.yaml").is_file() and (parent / "run.json").is_file():
            return parent / "config.yaml"
    return None


def _inspect_step(path: Path, console: Console) -> int:
    from align_core.safe_load import load_weights_only

    table = Table(show_header=False)
    table.add_column("")
    table.add_column("", overflow="fold")
    common_file = path / "common.pt"
    common: dict[str, Any] = {}
    optimizer = False
    if common_file.is_file():
        try:
            saved = load_weights_only(common_file, origin=str(common_file))
        except ValueError as exc:  # damaged, or a pickle naming a refused global
            raise UsageError(str(exc)) from exc
        common = dict(saved.get("common", {})) if isinstance(saved, dict) else {}
        optimizer = isinstance(saved, dict) and "optimizer" in saved
    trainer = common.get("trainer_state", {})
    extra = common.get("extra_state", {})
    step = common.get("step", trainer.get("step"))
    table.add_row("step", "unknown (no common.pt)" if step is None else str(step))
    if trainer:
        table.add_row(
            "progress",
            f"epoch {trainer.get('epoch', '?')}, {trainer.get('consumed_samples', '?')} examples "
            f"consumed, {trainer.get('skipped_steps', 0)} skipped steps",
        )
    model = extra.get("model")
    table.add_row("model", _architecture(model) if isinstance(model, dict) else "not recorded")
    layout = common.get("layout")
    if layout:
        table.add_row(
            "layout",
            f"{layout.get('world_size')} processes, TP={layout.get('tensor_model_parallel_size')} "
            f"PP={layout.get('pipeline_model_parallel_size')} "
            f"DP={layout.get('data_parallel_size')}",
        )
    if common:
        has = bool(common.get("has_optimizer", optimizer))
        kind = " (distributed)" if common.get("distributed_optimizer") else ""
        table.add_row("optimizer state", f"yes{kind}" if has else "no (weights only)")
        strategy = trainer.get("reference", {}).get("strategy")
        if strategy:
            table.add_row("reference", str(strategy))
        data = extra.get("data", {})
        if data:
            table.add_row(
                "data",
                f"{data.get('train_samples')} training examples, global batch "
                f"{data.get('global_batch_size')}, seed {data.get('seed')}",
            )
        planned = extra.get("plan", {}).get("max_steps")
        if planned is not None:
            table.add_row("planned steps", str(planned))
    config = _run_config(path)
    table.add_row("config", str(config) if config else "none (not inside a run directory)")
    table.add_row(
        "size",
        f"{_mib(_size(path))}, {sum(1 for p in path.rglob('*') if p.is_file())} files",
    )
    _title(console, f"checkpoint {path}")
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
    from align_core.config import ModelConfig, padded_vocab_size
    from align_core.nemo import write_tiny_nemo

    changes = {"vocab_size": TINY_VOCAB_SIZE, **changes}
    try:
        model = ModelConfig(**changes)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    path = write_tiny_nemo(out, model, seed=seed)
    # `ckpt inspect` shows the embedding rows (padded); say both, so the two agree.
    rows = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, 1)
    console.print(
        f"wrote {path} ({count_parameters(model):,} parameters, {model.num_layers} layers, "
        f"hidden {model.hidden_size}, vocab_size {model.vocab_size} padded to {rows} embedding "
        f"rows (a multiple of {model.make_vocab_size_divisible_by}))",
        highlight=False,
    )
    return 0
