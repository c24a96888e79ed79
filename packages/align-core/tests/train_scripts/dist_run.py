"""Under torchrun with 2 processes: the tiny DPO run at TP=2, PP=2 and DP=2, one after another.

Usage: torchrun --nproc-per-node 2 dist_run.py INITIAL.nemo WORK_DIR OUT_JSON

Each layout restores the same initial `.nemo` and uses another reference strategy; rank 0 writes
``{layout: {"loss": [...], "grad_norm": [...], "val_acc": ..., "strategy": ...}}``.
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny
import torch.distributed as dist

from align_core import ParallelConfig
from align_core.trainer import DataConfig, InMemorySink, ReferenceConfig, train

LAYOUTS = {
    "tp2": (ParallelConfig(tensor_model_parallel_size=2), "swap"),
    "pp2": (ParallelConfig(pipeline_model_parallel_size=2), "precompute"),
    "dp2": (ParallelConfig(), "model"),
}


def config(nemo: str, run_dir: Path, parallel: ParallelConfig, strategy: str):
    """The run every layout (and the single-process baseline) trains."""
    base = tiny.run_config(
        run_dir,
        data=DataConfig(
            micro_batch_size=2,
            global_batch_size=8,
            synthetic=tiny.run_config(run_dir).data.synthetic,
        ),
        trainer=tiny.TrainerConfig(max_steps=3, val_check_interval=3, save_interval=0),
        reference=ReferenceConfig(strategy=strategy),
        restore_from_path=nemo,
        export_nemo=False,
    )
    return dataclasses.replace(base, model=None, parallel=parallel)


def main() -> None:
    from megatron.core import parallel_state

    nemo, work, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    results = {}
    for name, (parallel, strategy) in LAYOUTS.items():
        sink = InMemorySink()
        result = train(config(nemo, work / name, parallel, strategy), sinks=[sink])
        if dist.get_rank() == 0:
            results[name] = {
                "loss": sink.series("loss"),
                "grad_norm": sink.series("grad_norm"),
                "val_acc": sink.val[-1][1]["acc"],
                "val_loss": sink.val[-1][1]["loss"],
                "strategy": result.reference_strategy,
                "data_parallel_size": sink.plan.data_parallel_size,
                "accumulation_steps": sink.plan.accumulation_steps,
            }
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
