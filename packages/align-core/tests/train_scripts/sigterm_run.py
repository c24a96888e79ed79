"""Train the tiny run of `tiny.run_config` and send this process SIGTERM after step 2.

Usage: python sigterm_run.py RUN_DIR OUT_JSON
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny

from align_core.trainer import InMemorySink, train


class SigtermAfterStep2(InMemorySink):
    def log(self, split, step, metrics):
        super().log(split, step, metrics)
        if split == "train" and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    run_dir, out = sys.argv[1], sys.argv[2]
    sink = SigtermAfterStep2()
    result = train(tiny.run_config(run_dir), sinks=[sink])
    Path(out).write_text(
        json.dumps(
            {
                "stop_reason": result.stop_reason,
                "steps": result.steps,
                "checkpoint": result.checkpoint,
                "nemo_path": result.nemo_path,
                "losses": sink.series("loss"),
            }
        )
    )


if __name__ == "__main__":
    main()
