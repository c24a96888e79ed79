"""The configuration tree: NeMo-Aligner names and defaults, overrides, suggestions, typing."""

from __future__ import annotations

import pytest

from align_cli.config import compose, normalize_data_prefix, to_run_config
from align_cli.config.compose import parse_overrides
from align_cli.config.presets import algorithm_of, check_variant
from align_cli.errors import ConfigError


def run_config(algorithm: str, overrides: list[str]):
    composed = compose(algorithm, overrides)
    return composed, to_run_config(algorithm, composed.tree, "runs/test")


def test_nemo_aligner_defaults_carry_over() -> None:
    # Values from NeMo-Aligner's gpt_dpo.yaml / gpt_kto.yaml (reference digest section 5).
    _, run = run_config("dpo", [])
    assert run.trainer.max_epochs == 1
    assert run.trainer.max_steps == -1
    assert run.trainer.val_check_interval == 0.1
    assert run.trainer.save_interval == 100
    assert run.trainer.gradient_clip_val == 1.0
    assert run.dpo.ref_policy_kl_penalty == 0.2
    assert run.dpo.preference_loss == "dpo"
    assert run.dpo.preference_loss_weight == 1.0
    assert run.dpo.sft_loss_weight == 0.0
    assert run.dpo.gt_reward_scale == 1.0
    assert run.data.micro_batch_size == 1
    assert run.data.global_batch_size == 64
    assert run.data.default_chosen_reward == 1.0
    assert run.data.default_rejected_reward == 0.0
    assert run.seed == 1234
    _, kto = run_config("kto", [])
    assert kto.kto.desirable_loss_weight == 1.0
    assert kto.kto.undesirable_loss_weight == 1.0


def test_nemo_aligner_dpo_command_line() -> None:
    # The DPO launch command of NeMo-Aligner's user guide, minus the launcher keys.
    composed, run = run_config(
        "dpo",
        [
            "trainer.num_nodes=1",
            "trainer.devices=8",
            "++model.micro_batch_size=1",
            "++model.global_batch_size=512",
            "pretrained_checkpoint.restore_from_path=/models/sft.nemo",
            "model.data.data_prefix={train: [train.jsonl], validation: [val.jsonl], "
            "test: [val.jsonl]}",
            "exp_manager.explicit_log_dir=/results",
            "++trainer.dpo.max_epochs=1",
            "++model.dpo.ref_policy_kl_penalty=0.1",
        ],
    )
    assert composed.tree.trainer.devices == 8
    assert run.data.global_batch_size == 512
    assert run.restore_from_path == "/models/sft.nemo"
    assert run.model is None  # the architecture comes from the checkpoint
    assert run.data.train_files == ("train.jsonl",)
    assert run.data.validation_files == ("val.jsonl",)
    assert run.dpo.ref_policy_kl_penalty == 0.1
    assert composed.tree.exp_manager.explicit_log_dir == "/results"


def test_kto_keys_and_lr() -> None:
    _, run = run_config(
        "kto",
        [
            "model.kto.ref_policy_kl_penalty=0.05",
            "model.kto.desirable_loss_weight=1.33",
            "model.optim.lr=5e-6",
            "model.optim.sched.name=CosineAnnealing",
            "model.optim.sched.warmup_steps=10",
            "model.optim.betas=[0.9,0.95]",
            "trainer.kto.max_steps=7",
            "model.tensor_model_parallel_size=2",
            "model.pipeline_model_parallel_size=2",
        ],
    )
    assert run.algorithm == "kto"
    assert run.kto.ref_policy_kl_penalty == 0.05
    assert run.kto.desirable_loss_weight == 1.33
    assert run.optim.lr == 5e-6
    assert run.optim.betas == (0.9, 0.95)
    assert run.sched.style == "cosine"
    assert run.sched.warmup_steps == 10
    assert run.trainer.max_steps == 7
    assert run.parallel.tensor_model_parallel_size == 2
    assert run.parallel.pipeline_model_parallel_size == 2


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_plus_prefixes_set_existing_keys(prefix: str) -> None:
    _, run = run_config("dpo", [f"{prefix}model.micro_batch_size=4"])
    assert run.data.micro_batch_size == 4


def test_parse_overrides_rejects_non_assignments() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["model.micro_batch_size"])
    with pytest.raises(ConfigError, match="deleting keys"):
        parse_overrides(["~model.seed"])


@pytest.mark.parametrize(
    ("override", "suggested"),
    [
        ("model.kto.desirable_weight=2", "model.kto.desirable_loss_weight"),
        ("model.micro_batchsize=2", "model.micro_batch_size"),
        ("mdoel.seed=3", "model.seed"),
        ("trainer.kto.max_step=3", "trainer.kto.max_steps"),
        ("model.optim.learning_rate=1", "model.optim.lr"),
    ],
)
def test_misspelt_keys_fail_with_closest_key(override: str, suggested: str) -> None:
    bad = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        compose("kto", [override])
    message = str(info.value)
    assert message.startswith(bad + ":")
    assert f"did you mean {suggested}?" in message


def test_other_algorithms_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.dpo belongs to `align run dpo`"):
        compose("kto", ["model.dpo.ref_policy_kl_penalty=0.1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.micro_batch_size=abc", "model.micro_batch_size: expected an integer, got 'abc'"),
        ("trainer.dpo.max_steps=1.5", "trainer.dpo.max_steps: expected an integer, got '1.5'"),
        ("model.optim.lr=fast", "model.optim.lr: expected a number, got 'fast'"),
        ("model.data.packing=maybe", "model.data.packing: expected true or false"),
        (
            "model.reference.strategy=swapp",
            "model.reference.strategy: 'swapp' is not one of",
        ),
    ],
)
def test_typed_conversion_errors_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose("dpo", [override])
    assert str(info.value).startswith(expected)


def test_choice_error_suggests_the_closest_value() -> None:
    with pytest.raises(ConfigError, match="did you mean 'ipo'"):
        compose("dpo", ["model.dpo.preference_loss=ipoo"])


def test_dataclass_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^model\.dpo\.label_smoothing"):
        compose("dpo", ["model.dpo.label_smoothing=0.7"])
    with pytest.raises(ConfigError, match=r"not a multiple of model\.micro_batch_size"):
        run_config("dpo", ["model.global_batch_size=6", "model.micro_batch_size=4"])


def test_val_check_interval_keeps_int_versus_float() -> None:
    # NeMo: an int counts steps, a float in (0, 1] is a fraction of an epoch.
    _, run = run_config("dpo", ["trainer.dpo.val_check_interval=1"])
    assert run.trainer.val_check_interval == 1 and isinstance(run.trainer.val_check_interval, int)
    _, run = run_config("dpo", ["trainer.dpo.val_check_interval=1.0"])
    assert isinstance(run.trainer.val_check_interval, float)
    with pytest.raises(ConfigError, match="expected a number"):
        compose("dpo", ["trainer.dpo.val_check_interval=often"])


def test_nemo_keys_without_effect_are_noted_not_failed() -> None:
    composed = compose("dpo", ["model.megatron_amp_O2=True", "++model.mcore_gpt=True"])
    assert len(composed.notes) == 2
    assert all("without effect" in note for note in composed.notes)


def test_precision_sets_dtype() -> None:
    _, run = run_config("sft", ["trainer.precision=bf16-mixed"])
    assert run.model is not None and run.model.dtype == "bf16"
    with pytest.raises(ConfigError, match=r"trainer\.precision"):
        run_config("sft", ["trainer.precision=64"])


def test_architecture_keys_build_the_fresh_model() -> None:
    _, run = run_config("dpo", ["model.num_layers=3", "model.encoder_seq_length=128"])
    assert run.model.num_layers == 3
    assert run.model.seq_length == 128


@pytest.mark.parametrize(
    ("value", "train", "validation"),
    [
        (None, (), ()),
        ("a.jsonl", ("a.jsonl",), ()),
        (["a.jsonl", "b.jsonl"], ("a.jsonl", "b.jsonl"), ()),
        (
            {"train": ["a.jsonl"], "validation": "v.jsonl", "test": ["t"]},
            ("a.jsonl",),
            ("v.jsonl",),
        ),
    ],
)
def test_data_prefix_shapes(value, train, validation) -> None:
    assert normalize_data_prefix(value) == (train, validation)


def test_data_prefix_unknown_split_is_suggested() -> None:
    with pytest.raises(ConfigError, match="did you mean 'validation'"):
        normalize_data_prefix({"valid": ["v.jsonl"]})


def test_ipo_and_rpo_are_dpo_runs_with_a_preset_loss() -> None:
    assert algorithm_of("ipo") == algorithm_of("rpo") == "dpo"
    check_variant("rpo", "rpo_sq")
    with pytest.raises(ConfigError, match="contradicts `align run ipo`"):
        check_variant("ipo", "dpo")
    with pytest.raises(ConfigError, match="contradicts `align run rpo`"):
        check_variant("rpo", "ipo")


def test_config_file_layer_and_its_bad_keys(tmp_path) -> None:
    from align_cli.config import load_tree

    good = tmp_path / "good.yaml"
    good.write_text("model:\n  dpo:\n    ref_policy_kl_penalty: 0.3\n  micro_batch_size: 2\n")
    composed = compose("dpo", ["model.micro_batch_size=4"], base=[load_tree("dpo", good)])
    run = to_run_config("dpo", composed.tree, "runs/x")
    assert run.dpo.ref_policy_kl_penalty == 0.3
    assert run.data.micro_batch_size == 4  # the command line wins over the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dpo:\n    ref_policy_kl_penatly: 0.3\n")
    with pytest.raises(ConfigError) as info:
        load_tree("dpo", bad)
    assert str(bad) in str(info.value)
    assert "did you mean model.dpo.ref_policy_kl_penalty?" in str(info.value)


def test_lora_keys_with_nemo_target_names() -> None:
    _, run = run_config("dpo", [])
    assert run.peft is None
    _, run = run_config(
        "dpo",
        [
            "model.peft.peft_scheme=lora",
            "model.peft.lora_tuning.adapter_dim=8",
            "model.peft.lora_tuning.adapter_dropout=0.05",
            "model.peft.lora_tuning.target_modules=[attention_qkv,mlp]",
        ],
    )
    assert run.peft.rank == 8
    assert run.peft.dropout == 0.05
    assert run.peft.target_modules == ("linear_qkv", "linear_fc1", "linear_fc2")
