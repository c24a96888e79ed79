"""2-process torchrun training (gloo): TP=2, PP=2 and DP=2 match the single-process run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_core import ParallelConfig
from align_core.nemo import TokenizerSpec, write_tiny_nemo
from align_core.trainer import InMemorySink, train

SCRIPTS = Path(__file__).parent / "train_scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"_align_core_tests_{name}", SCRIPTS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


@pytest.mark.distributed
def test_tp2_pp2_dp2_training_matches_one_process(dist_ctx, tmp_path):
    tiny, dist_run = _load("tiny"), _load("dist_run")
    nemo = write_tiny_nemo(
        tmp_path / "initial.nemo", tiny.MODEL, tokenizer=TokenizerSpec(library="byte-level")
    )
    out = tmp_path / "layouts.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            str(SCRIPTS / "dist_run.py"),
            str(nemo),
            str(tmp_path / "work"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    layouts = json.loads(out.read_text())

    sink = InMemorySink()
    baseline = dist_run.config(str(nemo), tmp_path / "single", ParallelConfig(), "precompute")
    train(baseline, sinks=[sink])
    want_loss, want_norm = sink.series("loss"), sink.series("grad_norm")
    assert len(want_loss) == 3
    for name, got in layouts.items():
        assert got["loss"] == pytest.approx(want_loss, rel=1e-5), name
        assert got["grad_norm"] == pytest.approx(want_norm, rel=1e-4), name
        assert got["val_loss"] == pytest.approx(sink.val[-1][1]["loss"], rel=1e-5), name
        assert got["val_acc"] == sink.val[-1][1]["acc"], name
    assert layouts["dp2"]["data_parallel_size"] == 2 and layouts["dp2"]["accumulation_steps"] == 2
    assert layouts["tp2"]["accumulation_steps"] == 4
    assert {n: g["strategy"] for n, g in layouts.items()} == {
        "tp2": "swap",
        "pp2": "precompute",
        "dp2": "model",
    }


def _free_port():
    from align_core import free_port

    return free_port()
