"""``align ckpt export``: a checkpoint -> a ``.nemo`` file or a Hugging Face directory.

The source is a run directory (its newest training checkpoint, or ``--step``), one ``step_*``
checkpoint of a run, a ``.nemo`` or a Hugging Face directory. Runs in one process whatever
layout the run trained with: megatron distributed checkpoints load into any tensor/pipeline
layout, and the vocabulary is padded as it was at the run's tensor-parallel size so the
embedding rows match. LoRA adapters are merged into the weights. Everything is done through
align-core (model build, checkpoint load, ``.nemo`` and Hugging Face writers).

A Hugging Face export keeps the architecture and ``config.json`` of a model that came from
Hugging Face (restored with ``--restore DIR``) and copies its tokenizer files; a model that came
from a ``.nemo`` or was initialised by align is written as ``LlamaForCausalLM``, without
tokenizer files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.console import Console

from align_cli.errors import UsageError

if TYPE_CHECKING:
    from align_cli.config.schema import TreeAlgorithm

__all__ = ["FORMATS", "export"]

FORMATS = ("nemo", "hf")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _run_checkpoint(src: Path, step: int | None) -> tuple[Path, int | None] | None:
    """``(run_dir, step)`` when ``src`` is a run directory or one of its ``step_*`` checkpoints."""
    from align_cli.rundir import RUN_FILE

    if (src / RUN_FILE).is_file():
        return src, step
    match = _STEP_DIR.match(src.name)
    run_dir = src.parent.parent
    if match and src.parent.name == "checkpoints" and (run_dir / RUN_FILE).is_file():
        chosen = int(match.group(1))
        if step is not None and step != chosen:
            raise UsageError(f"--step {step} contradicts the checkpoint {src} (step {chosen})")
        return run_dir, chosen
    return None


def export(src: str, out: str | None, step: int | None, fmt: str, console: Console) -> int:
    """Write ``src`` as ``fmt`` (``nemo`` or ``hf``) to ``out``.

    Raises:
        UsageError: An unknown format or source, no such checkpoint, or no ``--out`` for a
            pretrained source.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    source = Path(src)
    if not source.exists():
        raise UsageError(f"{src}: no such file or directory")
    found = _run_checkpoint(source, step)
    if found is not None:
        return _export_run(*found, out, fmt, console)
    if step is not None:
        raise UsageError(f"--step: {src} is not a run directory")
    if out is None:
        raise UsageError(f"--out: where to write the {fmt} export of {src}")
    return _export_pretrained(source, Path(out), fmt, console)


def _export_pretrained(source: Path, target: Path, fmt: str, console: Console) -> int:
    """A `.nemo` or a Hugging Face directory, converted in one process."""
    from align_cli.worker import quiet_library_warnings

    quiet_library_warnings()
    from align_core.config import ParallelConfig
    from align_core.model import build_gpt_model
    from align_core.parallel import destroy_distributed, init_distributed
    from align_core.pretrained import load_pretrained_weights, open_pretrained

    init_distributed(ParallelConfig(), seed=0)
    try:
        with open_pretrained(source) as ckpt:
            model_config = ckpt.model_config_for(1)
            model = build_gpt_model(model_config, ParallelConfig())
            load_pretrained_weights(model, ckpt)
            path = _write(model, model_config, target, fmt, str(source))
    finally:
        destroy_distributed()
    console.print(f"wrote {path} ({fmt}, from {source})", highlight=False)
    return 0


def _export_run(root: Path, step: int | None, out: str | None, fmt: str, console: Console) -> int:
    """A training checkpoint of a run (newest, or ``step``)."""
    from omegaconf import DictConfig, OmegaConf

    from align_cli.config import compose, to_run_config
    from align_cli.config.restore import base_model_for
    from align_cli.rundir import CONFIG_FILE, read_run_info
    from align_cli.worker import quiet_library_warnings

    info = read_run_info(root)
    saved = OmegaConf.load(root / CONFIG_FILE)
    assert isinstance(saved, DictConfig)  # `align run` writes the tree as a mapping
    # run.json names the tree `align run` composed; compose rejects any other name.
    composed = compose(cast("TreeAlgorithm", info.algorithm), base=[saved])
    run = to_run_config(
        composed.algorithm, composed.tree, str(root), base_model=base_model_for(composed.tree)
    )
    quiet_library_warnings()
    from align_core.checkpoint import Checkpointer
    from align_core.config import ParallelConfig
    from align_core.parallel import destroy_distributed, init_distributed
    from align_core.trainer.build import build_policy, resolve_model_source
    from align_core.training import wrap_ddp

    checkpointer = Checkpointer(root / "checkpoints", keep_last=run.trainer.keep_last_checkpoints)
    chosen = step if step is not None else checkpointer.latest_step()
    if chosen is None or chosen not in checkpointer.steps():
        raise UsageError(
            f"{root}: no checkpoint for step {chosen}; available: {checkpointer.steps() or 'none'}"
        )
    default_name = f"step_{chosen:06d}.nemo" if fmt == "nemo" else f"step_{chosen:06d}_hf"
    target = Path(out) if out else root / default_name
    single = ParallelConfig()
    saved_tp = run.parallel.tensor_model_parallel_size
    init_distributed(single, seed=run.seed)
    try:
        source = resolve_model_source(dataclasses.replace(run, parallel=single))
        model_config = source.model
        if run.restore_from_path is None and saved_tp > 1:
            # Fresh models pad the vocabulary to a multiple of divisor × TP: keep the saved rows.
            divisor = model_config.make_vocab_size_divisible_by * saved_tp
            model_config = model_config.replace(make_vocab_size_divisible_by=divisor)
            source = dataclasses.replace(source, model=model_config)
        policy = build_policy(source, single)
        if run.peft is not None:
            from align_core.lora import add_lora

            add_lora(policy, run.peft)
        model = wrap_ddp(policy)
        checkpointer.load(model, None, step=chosen, load_rng=False)
        if run.peft is not None:
            from align_core.lora import merge_lora

            merge_lora(policy)
        path = _write(model, model_config, target, fmt, run.restore_from_path)
    finally:
        destroy_distributed()
    console.print(f"wrote {path} ({fmt}, step {chosen} of {root})", highlight=False)
    return 0


def _write(model: Any, model_config: Any, target: Path, fmt: str, origin: str | None) -> Path:
    """Write ``model`` as ``fmt`` to ``target``.

    ``origin`` (the restored checkpoint, if any) gives the tokenizer, and for a Hugging Face
    export of a Hugging Face model its ``config.json``.
    """
    from align_core.pretrained import open_pretrained

    with contextlib.ExitStack() as stack:
        ckpt = None if origin is None else stack.enter_context(open_pretrained(origin))
        if fmt == "nemo":
            from align_core.nemo import save_nemo

            spec = None if ckpt is None else ckpt.tokenizer
            return Path(save_nemo(model, target, model_config, tokenizer=spec))
        from align_core.hf import HFCheckpoint, save_hf

        if isinstance(ckpt, HFCheckpoint):
            return Path(save_hf(model, target, model_config, source=ckpt))
        spec = None if ckpt is None else ckpt.tokenizer
        return Path(save_hf(model, target, model_config, tokenizer=spec))
