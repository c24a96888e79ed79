"""Learning tests: DPO and KTO on align-data's synthetic task reach high held-out accuracy.

Held-out preference accuracy is the fraction of held-out pairs whose implicit reward margin
``β·[(π_c − π_ref,c) − (π_r − π_ref,r)]`` is positive. At step 0 the policy is the reference,
every margin is exactly 0, and the accuracy (strict ``>``) is 0; after training it must be at
least 0.9. Prompts of the held-out pairs never occur in training.

DPO starts from the randomly initialised tiny model. KTO starts, as in the usual pipeline, from
a briefly supervised model (SFT on the chosen responses, which then is the reference): from a
random model the unpaired signal on this task settles on an unconditional rule ("lower case is
good", right for two of the three styles) and stays at 0.875, because every sequence reward is
dominated by the many shared word tokens; relative to an SFT reference those tokens barely move
and the style tokens carry the reward.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from align_core.algorithms import DPOConfig, KTOConfig, SFTConfig
from align_core.algorithms.dpo import DPOStep
from align_core.algorithms.kto import KTOStep
from align_core.algorithms.sft import SFTStep
from align_core.reference import SwapReference
from align_core.schedule import forward_backward
from align_core.trainer import InMemorySink, TrainerConfig

_spec = importlib.util.spec_from_file_location(
    "_align_core_tests_tiny", Path(__file__).parent / "train_scripts" / "tiny.py"
)
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)

NUM_TRAIN, NUM_HELD_OUT = 512, 64


def _held_out_pairs():
    pairs = T.preference_examples(NUM_TRAIN + NUM_HELD_OUT, seed=7)[NUM_TRAIN:]
    return [
        type(p)(p.prompt_ids, p.chosen_ids, p.rejected_ids, index=i) for i, p in enumerate(pairs)
    ]


def _preference_accuracy(model, reference):
    """Held-out accuracy and mean margin of ``model`` against ``reference``."""
    step = DPOStep(DPOConfig(ref_policy_kl_penalty=0.1))
    held = T.data(_held_out_pairs(), [], step, mbs=16, gbs=NUM_HELD_OUT, shuffle=False)
    batches = held.train_micro_batches(0)
    for mb, ref in zip(batches, reference.logps(batches, split="val"), strict=True):
        mb["ref_logps"] = ref
    was_training = model.training
    model.eval()
    try:
        outputs = forward_backward(
            model, batches, T.FORWARD, step.loss_fn(torch.tensor(1.0)), forward_only=True
        )
    finally:
        model.train(was_training)
    sums = {k: sum(float(o[k]) for o in outputs) for k in outputs[0]}
    metrics = step.finalize_metrics(sums)
    return metrics["acc"], metrics["rewards_margin"]


def _sft_warm_start(policy, steps=30):
    step = SFTStep(SFTConfig())
    examples = T.sft_examples(NUM_TRAIN + NUM_HELD_OUT, seed=7)[:NUM_TRAIN]
    sink = InMemorySink()
    config = TrainerConfig(max_steps=steps, val_check_interval=0, save_interval=0)
    sft = T.trainer(
        policy, step, T.data(examples, [], step, mbs=16, gbs=16), config=config, sinks=[sink]
    )
    assert sft.fit() == "completed"
    losses = sink.series("loss")
    assert losses[-1] < losses[0]
    return policy


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_held_out_preference_accuracy_rises_to_0_9(dist_ctx, algorithm):
    policy = T.fresh_model()
    if algorithm == "dpo":
        step = DPOStep(DPOConfig(ref_policy_kl_penalty=0.1))
        train = T.preference_examples(NUM_TRAIN + NUM_HELD_OUT, seed=7)[:NUM_TRAIN]
        steps = 30
    else:
        _sft_warm_start(policy)
        step = KTOStep(KTOConfig(ref_policy_kl_penalty=0.1))
        train = T.unpaired_examples(NUM_TRAIN + NUM_HELD_OUT, seed=7)[: 2 * NUM_TRAIN]
        steps = 40
    reference = SwapReference(policy, T.FORWARD)
    source = T.data(train, [], step, mbs=8, gbs=16)
    sink = InMemorySink()
    config = TrainerConfig(max_steps=steps, val_check_interval=0, save_interval=0)
    trainer = T.trainer(policy, step, source, reference=reference, config=config, sinks=[sink])

    before, margin0 = _preference_accuracy(trainer.model, reference)
    assert before == 0.0 and margin0 == 0.0  # policy = reference: every margin is exactly 0
    assert trainer.fit() == "completed"
    after, margin = _preference_accuracy(trainer.model, reference)
    print(f"{algorithm}: held-out accuracy {before:.3f} -> {after:.3f}, margin {margin:.3f}")
    assert after >= 0.9 and margin > 0
    losses = sink.series("loss")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
