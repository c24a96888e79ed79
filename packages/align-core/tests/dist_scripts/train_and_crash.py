"""Train two steps in one process (the production trainer), checkpointing after each; die
(SIGKILL) while publishing the second checkpoint, after its files are written and before the
rename.

Usage: python train_and_crash.py CKPT_DIR RESULT_JSON
Writes the loss of every step to RESULT_JSON before the fatal save.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings


def main() -> None:
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.dirname(__file__))
    import _common as c

    from align_core import (
        Checkpointer,
        ModelConfig,
        OptimizerConfig,
        ParallelConfig,
        build_gpt_model,
        build_optimizer,
        init_distributed,
        seed_all,
        wrap_ddp,
    )
    from align_core import checkpoint as checkpoint_module

    ckpt_dir, result_path = sys.argv[1], sys.argv[2]
    init_distributed(ParallelConfig())
    seed_all(99)
    model = wrap_ddp(build_gpt_model(ModelConfig()))
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3), clip_grad=1.0)
    checkpointer = Checkpointer(ckpt_dir, keep_last=2)
    losses = []
    for step in (1, 2):
        tokens, labels = c.data(seed=step)
        metrics = c.train_step(model, optimizer, c.micro_batches(tokens, labels, 2))
        losses.append(metrics["loss"])
        with open(result_path, "w") as f:
            json.dump({"losses": losses}, f)
        if step == 2:
            checkpoint_module._before_publish = lambda path: os.kill(os.getpid(), signal.SIGKILL)
        checkpointer.save(step, model, optimizer, trainer_state={"step": step})


if __name__ == "__main__":
    main()
