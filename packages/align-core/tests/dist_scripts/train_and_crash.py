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

    from align_core import Checkpointer, ParallelConfig, init_distributed
    from align_core import checkpoint as checkpoint_module

    ckpt_dir, result_path = sys.argv[1], sys.argv[2]
    init_distributed(ParallelConfig())
    model, optimizer = c.trainable(99)
    checkpointer = Checkpointer(ckpt_dir, keep_last=2)
    losses = []
    for step in (1, 2):
        metrics = c.train_step_on(model, optimizer, step)
        losses.append(metrics["loss"])
        with open(result_path, "w") as f:
            json.dump({"losses": losses}, f)
        if step == 2:
            checkpoint_module._before_publish = lambda path: os.kill(os.getpid(), signal.SIGKILL)
        checkpointer.save(step, model, optimizer, trainer_state={"step": step})


if __name__ == "__main__":
    main()
