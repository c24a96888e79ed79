"""A SPIN run on two data-parallel ranks (torchrun, gloo) with one prompt per generation call.

Usage: ``torchrun --nproc_per_node=2 dp2_spin.py <run_dir> <out.json>``. Rank 0 writes the per-step
training metrics and the run result to ``out.json``; a crash writes the traceback there instead.
The test compares them, and the generations file, with a one-process run.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def main(run_dir: str, out: str) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import importlib.util

    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location(
        "spin_config", Path(__file__).with_name("config.py")
    )
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    from align_core.trainer import InMemorySink
    from align_core.trainer.spin import train_spin

    sink = InMemorySink()
    try:
        run = config.spin_config(run_dir, micro_batch_size=2, rollout_micro_batch_size=1)
        result = train_spin(run, [sink])
        payload = {"train": sink.train, "val": sink.val, "steps": result.steps}
    except Exception:
        payload = {"crashed": traceback.format_exc()}
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(out).write_text(json.dumps(payload))
        raise
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(payload))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
