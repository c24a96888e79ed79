"""``align ckpt export``: a training checkpoint of a run -> a ``.nemo`` file.

Runs in one process whatever layout the run trained with: megatron distributed checkpoints load
into any tensor/pipeline layout, and the vocabulary is padded as it was at the run's
tensor-parallel size so the embedding rows match. LoRA adapters are merged into the weights.
Everything is done through align-core (model build, checkpoint load, ``.nemo`` writer).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from rich.console import Console

from align_cli.errors import UsageError

__all__ = ["export"]


def export(run_dir: str, out: str | None, step: int | None, console: Console) -> int:
    """Write ``out`` (default ``RUN_DIR/step_N.nemo``) from checkpoint ``step`` (default newest).

    Raises:
        UsageError: Not a run directory, or no such checkpoint.
    """
    from omegaconf import OmegaConf

    from align_cli.config import compose, to_run_config
    from align_cli.config.restore import base_model_for
    from align_cli.rundir import CONFIG_FILE, read_run_info
    from align_cli.worker import quiet_library_warnings

    root = Path(run_dir)
    info = read_run_info(root)
    composed = compose(info.algorithm, base=[OmegaConf.load(root / CONFIG_FILE)])  # type: ignore[arg-type]
    run = to_run_config(
        composed.algorithm, composed.tree, str(root), base_model=base_model_for(composed.tree)
    )
    quiet_library_warnings()
    from align_core.checkpoint import Checkpointer
    from align_core.config import ParallelConfig
    from align_core.nemo import save_nemo
    from align_core.parallel import destroy_distributed, init_distributed
    from align_core.trainer.build import build_policy, resolve_model_source
    from align_core.training import wrap_ddp

    checkpointer = Checkpointer(root / "checkpoints", keep_last=run.trainer.keep_last_checkpoints)
    chosen = step if step is not None else checkpointer.latest_step()
    if chosen is None or chosen not in checkpointer.steps():
        raise UsageError(
            f"{root}: no checkpoint for step {chosen}; available: {checkpointer.steps() or 'none'}"
        )
    target = Path(out) if out else root / f"step_{chosen:06d}.nemo"
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
        with contextlib.ExitStack() as stack:
            spec = source.tokenizer_spec
            if run.restore_from_path is not None:
                # The tokenizer files live in the restored .nemo: keep it open while writing.
                from align_core.nemo import open_nemo

                spec = stack.enter_context(open_nemo(run.restore_from_path)).tokenizer
            path = save_nemo(model, target, model_config, tokenizer=spec)
    finally:
        destroy_distributed()
    console.print(f"wrote {path} (step {chosen} of {root})", highlight=False)
    return 0
