"""The algorithm registry: one entry per ``align run`` command, read by trainer and CLI."""

from __future__ import annotations

import dataclasses

import pytest

from align_core.algorithms import (
    REGISTRY,
    AlgorithmSpec,
    DPOConfig,
    KTOConfig,
    SFTConfig,
    _common,
    contract,
    get_algorithm,
)
from align_core.trainer import RunConfig
from align_core.trainer.build import (
    build_algorithm,
    forward_merge,
    needs_reference,
    reference_merge,
)

# The algorithms trained by the shared loop, in registry order (SPIN and KD have their own).
SHARED_LOOP = ["dpo", "ipo", "rpo", "simpo", "cpo", "orpo", "kto", "sft"]


def test_every_name_round_trips() -> None:
    assert list(REGISTRY) == [*SHARED_LOOP, "spin", "kd"]
    for name, spec in REGISTRY.items():
        assert isinstance(spec, AlgorithmSpec)
        assert get_algorithm(name) is spec
        assert spec.name == name
        assert get_algorithm(spec.base).base == spec.base
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "x"  # type: ignore[misc]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'slic'") as info:
        get_algorithm("slic")
    assert "dpo, ipo, rpo, simpo, cpo, orpo, kto, sft, spin, kd" in str(info.value)


def test_the_dpo_family_is_presets_of_the_dpo_step() -> None:
    for name, loss in (("dpo", "dpo"), ("ipo", "ipo"), ("rpo", "rpo_bwd_kl")):
        spec = get_algorithm(name)
        assert spec.base == "dpo" and spec.config_class is DPOConfig and spec.section == "dpo"
        assert spec.is_preset == (name != "dpo")
        config = dataclasses.replace(DPOConfig(), **spec.preset)
        assert config.preference_loss == loss
        step = spec.build_step(config)
        assert step.name == "dpo" and step.config.preference_loss == loss


@pytest.mark.parametrize(
    ("name", "config", "expected"),
    [
        ("dpo", DPOConfig(), True),
        ("ipo", DPOConfig(preference_loss="ipo"), True),
        ("kto", KTOConfig(), True),
        ("sft", SFTConfig(), False),
    ],
)
def test_needs_reference_is_computed_from_the_config(
    name: str, config: object, expected: bool
) -> None:
    spec = get_algorithm(name)
    assert spec.needs_reference(config) is expected
    # The step the shared loop builds agrees with the registry.
    step = spec.build_step(config)
    assert step.needs_reference is expected
    for member in ("name", "ref_shape", "build_micro_batch", "normalizer", "loss_fn"):
        assert hasattr(step, member), member


def test_shared_loop_facts() -> None:
    assert [n for n, s in REGISTRY.items() if s.shared_loop] == SHARED_LOOP
    assert get_algorithm("kto").pack_factor is None
    assert get_algorithm("dpo").pack_factor == 2 and get_algorithm("sft").pack_factor == 1
    assert get_algorithm("kto").synthetic_splits == ("unpaired_train", "unpaired_eval")
    assert get_algorithm("kd").config_class is None
    with pytest.raises(ValueError, match="not trained by the shared loop"):
        get_algorithm("spin").build_step(None)


def test_trainer_reads_the_registry() -> None:
    run = RunConfig(algorithm="kto", run_dir="unused")
    run.data.micro_batch_size = 2
    assert build_algorithm(run, None).name == "kto"
    assert needs_reference(run)
    run.kto.log_prob_forward_micro_batch_size = 8
    assert reference_merge(run) == 2  # 8 sequences / (2 × 2 per micro-batch)
    sft = RunConfig(algorithm="sft", run_dir="unused")
    assert not needs_reference(sft) and reference_merge(sft) == 1


def test_the_contract_is_public() -> None:
    assert _common.AlgorithmStep is contract.AlgorithmStep
    assert _common.ModelBatch is contract.ModelBatch
    assert "AlgorithmStep" in contract.__all__


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_reference_free_commands_are_dpo_presets_without_a_reference(name: str) -> None:
    spec = get_algorithm(name)
    assert spec.base == "dpo" and spec.variant_key == "preference_loss"
    config = dataclasses.replace(DPOConfig(), **spec.preset)
    assert config.preference_loss == name
    assert spec.needs_reference(config) is False
    assert spec.build_step(config).needs_reference is False


def test_forward_merge_counts_training_micro_batches_and_refuses_uneven_splits() -> None:
    # DPO counts pairs (one unit per example), KTO its two sequences, SPIN pairs; SFT has no
    # reference. SPIN's run and the shared loop take the same rule.
    assert forward_merge("dpo", 8, micro_batch_size=2, accumulation=4) == 4
    assert forward_merge("kto", 8, micro_batch_size=2, accumulation=4) == 2
    assert forward_merge("spin", 6, micro_batch_size=2, accumulation=3) == 3
    assert forward_merge("sft", 8, micro_batch_size=2) == 1
    assert forward_merge("dpo", None, micro_batch_size=2) == 1
    with pytest.raises(ValueError, match=r"model\.kto\.log_prob_forward_micro_batch_size 6 must"):
        forward_merge("kto", 6, micro_batch_size=2)
    with pytest.raises(ValueError, match="covers 2 training micro-batches, which does not divide"):
        forward_merge("spin", 4, micro_batch_size=2, accumulation=3)
