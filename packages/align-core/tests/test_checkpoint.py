import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _core_torchrun import LAUNCHER_ENV

from align_core import Checkpointer, ModelConfig, build_gpt_model, seed_all

SCRIPTS = Path(__file__).parent / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))
import _common as c  # noqa: E402


def _step(model, optimizer, data_seed):
    return c.train_step_on(model, optimizer, data_seed)["loss"]


def _params(model):
    return {n: p.detach().clone() for n, p in model.module.named_parameters()}


def test_resume_gives_the_uninterrupted_next_step_loss(dist_ctx, tmp_path):
    model, optimizer = c.trainable(1)
    for s in (1, 2):
        _step(model, optimizer, s)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.save(2, model, optimizer, trainer_state={"step": 2}, extra_state={"sampler": [3, 1]})
    saved_params = _params(model)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ckpt.save(3, model, optimizer, trainer_state={"step": 3})  # saves these RNG states
    draws = (random.random(), np.random.rand(), torch.rand(3))
    uninterrupted = [_step(model, optimizer, s) for s in (3, 4)]

    fresh, fresh_opt = c.trainable(2)  # different initial weights
    info = ckpt.load(fresh, fresh_opt, step=2)
    assert info.step == 2 and info.trainer_state == {"step": 2}
    assert info.extra_state == {"sampler": [3, 1]}
    assert info.rng_restored and info.optimizer_restored
    for name, p in _params(fresh).items():
        assert torch.equal(p, saved_params[name]), name

    info = ckpt.load(fresh, fresh_opt)  # the newest: step 3, with its RNG states
    assert info.step == 3
    assert (random.random(), np.random.rand()) == draws[:2]
    assert torch.equal(torch.rand(3), draws[2])
    resumed = [_step(fresh, fresh_opt, s) for s in (3, 4)]
    assert resumed == uninterrupted


def test_layout_of_the_directory_and_keep_last(dist_ctx, tmp_path):
    model, optimizer = c.trainable(3)
    ckpt = Checkpointer(tmp_path / "run", keep_last=2)
    assert ckpt.latest_step() is None and ckpt.load(model) is None
    for step in (10, 20, 30):
        ckpt.save(step, model)
    assert ckpt.steps() == [20, 30]
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_000030"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "latest",
        "step_000020",
        "step_000030",
    ]
    with pytest.raises(FileNotFoundError):
        ckpt.load(model, step=10)
    # Resuming from an earlier step and saving again: `latest` names the newest write, and
    # pruning never removes it.
    ckpt.save(25, model)
    assert ckpt.latest_step() == 25 and ckpt.steps() == [25, 30]
    (tmp_path / "run" / "latest").unlink()  # e.g. killed between the rename and the marker
    assert ckpt.latest_step() == 30
    with pytest.raises(ValueError, match="no optimizer state"):
        ckpt.load(model, optimizer)
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)


def test_extra_models_as_module_and_as_state_dict(dist_ctx, tmp_path):
    model, _ = c.trainable(4)
    seed_all(5)
    reference = build_gpt_model(ModelConfig())
    cpu_copy = {k: v.clone() for k, v in reference.state_dict().items() if torch.is_tensor(v)}
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, model, extra_models={"reference": reference, "snapshot": cpu_copy})

    seed_all(6)
    into_module = build_gpt_model(ModelConfig())
    into_state = {k: torch.zeros_like(v) for k, v in cpu_copy.items()}
    ckpt.load(model, extra_models={"reference": into_module, "snapshot": into_state})
    for k, v in reference.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(into_module.state_dict()[k], v), k
            assert torch.equal(into_state[k], v), k
    with pytest.raises(KeyError, match="missing"):
        ckpt.load(model, extra_models={"missing": into_module})


def test_killed_mid_save_leaves_the_previous_checkpoint_resumable(dist_ctx, tmp_path):
    ckpt_dir, result = tmp_path / "ckpt", tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model; extra threads only contend
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_and_crash.py"), str(ckpt_dir), str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    losses = json.loads(result.read_text())["losses"]
    assert len(losses) == 2
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["latest", "step_000001", "tmp.step_000002"]
    assert (ckpt_dir / "latest").read_text().strip() == "step_000001"

    ckpt = Checkpointer(ckpt_dir, keep_last=2)
    model, optimizer = c.trainable(7)
    info = ckpt.load(model, optimizer)
    assert info.step == 1
    assert _step(model, optimizer, 2) == pytest.approx(losses[1], rel=1e-6, abs=1e-6)
    ckpt.save(2, model, optimizer)  # the next save clears the debris
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_000001", "step_000002"]


def test_check_resume_names_the_first_differing_key():
    from align_core.checkpoint import check_resume

    saved = {"data": "abc", "global_batch_size": 8}
    check_resume(saved, {"data": "abc", "global_batch_size": 8, "new_key": 1}, "ckpt/step_2")
    with pytest.raises(ValueError) as err:
        check_resume(saved, {"data": "abc", "global_batch_size": 16}, "ckpt/step_2", needs="why")
    assert str(err.value) == (
        "cannot resume from ckpt/step_2: its global_batch_size is 8, this run has 16 (why)"
    )
