"""TR-DPO: the reference follows the policy during training (``model.reference.update_alpha``)."""

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
from _core_scripts import load_tiny

from align_core.trainer import InMemorySink, ReferenceConfig, TrainerConfig, train

T = load_tiny()

STEPS = TrainerConfig(max_steps=4, val_check_interval=0, save_interval=2, keep_last_checkpoints=4)


def _run(run_dir, reference: ReferenceConfig) -> tuple[object, InMemorySink]:
    sink = InMemorySink()
    result = train(T.run_config(run_dir, trainer=STEPS, reference=reference), sinks=[sink])
    return result, sink


def _stopped_at_step_2(whole: Path, copy: Path) -> Path:
    """A copy of the 4-step run ``whole`` as if it had stopped after saving step 2."""
    shutil.copytree(whole, copy)
    checkpoints = copy / "checkpoints"
    shutil.rmtree(checkpoints / "step_000004")
    for pointer in checkpoints.glob("latest*"):
        pointer.write_text("step_000002\n")
    (copy / "final.nemo").unlink(missing_ok=True)
    return copy


@pytest.mark.parametrize("strategy", ["swap", "model"])
def test_a_hard_copy_every_step_starts_every_step_at_ln2(dist_ctx, tmp_path, strategy):
    """α = 1, τ = 1: at the start of each step the reference is the policy, so DPO's loss is
    exactly ln 2 on every step; with a frozen reference it leaves ln 2 after the first."""
    updated, sink = _run(
        tmp_path / "tr", ReferenceConfig(strategy=strategy, update_alpha=1.0, update_interval=1)
    )
    assert updated.reference_strategy == strategy
    assert sink.series("loss") == pytest.approx([math.log(2)] * 4, abs=1e-6)
    _, frozen = _run(tmp_path / "frozen", ReferenceConfig(strategy=strategy))
    assert frozen.series("loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert all(abs(v - math.log(2)) > 1e-4 for v in frozen.series("loss")[1:])


def test_soft_updates_agree_across_strategies_and_resume_exactly(dist_ctx, tmp_path):
    """α = 0.5 every 2 steps; ``auto`` resolves to swap. The updated reference is saved with
    the checkpoint: resuming at step 2 reproduces the uninterrupted steps 3 and 4."""
    reference = ReferenceConfig(strategy="auto", update_alpha=0.5, update_interval=2)
    whole, whole_sink = _run(tmp_path / "whole", reference)
    assert whole.reference_strategy == "swap"
    _, model_sink = _run(tmp_path / "model", dataclasses.replace(reference, strategy="model"))
    assert model_sink.series("loss") == pytest.approx(whole_sink.series("loss"), rel=1e-6)

    resumed_dir = _stopped_at_step_2(tmp_path / "whole", tmp_path / "resumed")
    resumed, resumed_sink = _run(resumed_dir, reference)
    assert resumed_sink.plan.start_step == 2
    assert resumed_sink.series("loss") == pytest.approx(whole_sink.series("loss")[2:], rel=1e-6)
    # Without the saved reference the resumed run would compare against the initial policy.
    assert resumed.steps == 4


@pytest.mark.parametrize("strategy", ["precompute", "adapters"])
def test_a_reference_without_weights_cannot_be_updated(tmp_path, strategy):
    with pytest.raises(ValueError, match="update_alpha needs a reference that holds weights"):
        train(
            T.run_config(tmp_path, reference=ReferenceConfig(strategy=strategy, update_alpha=0.5))
        )


def test_update_settings_are_checked():
    with pytest.raises(ValueError, match="update_alpha"):
        ReferenceConfig(update_alpha=0.0)
    with pytest.raises(ValueError, match="update_interval"):
        ReferenceConfig(update_alpha=0.5, update_interval=0)


def test_bco_pairs_reward_mean_is_checkpointed_and_resumes_exactly(dist_ctx, tmp_path):
    """``bco_pair`` keeps δ across steps: a run resumed at step 2 reproduces steps 3 and 4 of
    the uninterrupted run only if δ came back with the checkpoint."""
    from megatron.core import dist_checkpointing

    from align_core.algorithms import DPOConfig

    def run(run_dir):
        sink = InMemorySink()
        config = T.run_config(run_dir, trainer=STEPS)
        config.dpo = DPOConfig(preference_loss="bco_pair", ref_policy_kl_penalty=0.5)
        train(config, sinks=[sink])
        return sink

    whole = run(tmp_path / "whole")
    assert whole.series("loss")[0] == pytest.approx(2 * math.log(2), abs=1e-6)
    step_2 = tmp_path / "whole" / "checkpoints" / "step_000002"
    state = dist_checkpointing.load_common_state_dict(str(step_2))["common"]["trainer_state"]
    assert state["algorithm"]["reward_mean"]["count"] == 2 * 2 * 8  # 2 steps × 8 pairs × 2

    resumed_dir = _stopped_at_step_2(tmp_path / "whole", tmp_path / "resumed")
    resumed = run(resumed_dir)
    assert resumed.series("loss") == pytest.approx(whole.series("loss")[2:], rel=1e-6)
