"""`align_core.trainer.train` end to end: SIGTERM, resume, export, early errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _core_scripts import load_tiny

from align_core.nemo import open_nemo
from align_core.trainer import DataConfig, InMemorySink, train

SCRIPTS = Path(__file__).parent / "train_scripts"
T = load_tiny()


def test_sigterm_leaves_a_checkpoint_that_resumes_like_an_uninterrupted_run(dist_ctx, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out.json"
    # A fresh single-process world: not this process's rendezvous address.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "sigterm_run.py"), str(run_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = json.loads(out.read_text())
    assert killed["stop_reason"] == "sigterm" and killed["steps"] == 2
    assert killed["nemo_path"] is None  # an interrupted run exports nothing
    assert Path(killed["checkpoint"]).name == "step_000002"

    resumed_sink = InMemorySink()
    resumed = train(T.run_config(run_dir), sinks=[resumed_sink])
    assert resumed.stop_reason == "completed" and resumed.steps == 4
    assert resumed_sink.plan.start_step == 2 and resumed_sink.plan.resumed_from is not None
    assert [s for s, _ in resumed_sink.train] == [3, 4]

    whole_sink = InMemorySink()
    whole = train(T.run_config(tmp_path / "whole"), sinks=[whole_sink])
    losses = whole_sink.series("loss")
    assert losses[:2] == pytest.approx(killed["losses"], rel=1e-6, abs=0)
    # Step k+1 after resuming at step k equals the uninterrupted run's step k+1.
    assert resumed_sink.series("loss") == pytest.approx(losses[2:], rel=1e-6, abs=0)
    assert resumed_sink.series("grad_norm") == pytest.approx(
        whole_sink.series("grad_norm")[2:], rel=1e-5
    )
    assert whole.reference_strategy == "precompute"
    assert [s for s, _ in whole_sink.val] == [2, 4] and "acc" in whole_sink.val[0][1]

    # The final policy is exported and readable.
    assert whole.nemo_path is not None
    with open_nemo(whole.nemo_path) as ckpt:
        assert ckpt.model_config.num_layers == T.MODEL.num_layers
        assert ckpt.tokenizer is not None and ckpt.tokenizer.library == "byte-level"


def test_a_run_restored_from_a_nemo_exports_its_tokenizer_and_trained_weights(dist_ctx, tmp_path):
    """The restored archive's temporary extraction is gone by the time final.nemo is written."""
    pytest.importorskip("tokenizers")
    import tarfile

    import torch

    from align_core import ModelConfig
    from align_core.nemo import write_byte_bpe_files, write_tiny_nemo
    from align_core.trainer import TrainerConfig

    tiny = ModelConfig(
        num_layers=1,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=2,
        vocab_size=320,
        seq_length=64,
    )
    files = write_byte_bpe_files(tmp_path / "tokenizer", tiny.vocab_size)
    source = write_tiny_nemo(tmp_path / "source.nemo", tiny, tokenizer=files, seed=5)
    result = train(
        T.run_config(
            tmp_path / "run",
            algorithm="sft",
            model=None,
            restore_from_path=str(source),
            data=_synthetic(16),
            trainer=TrainerConfig(max_steps=1, val_check_interval=0, save_interval=0),
        )
    )
    assert result.stop_reason == "completed"
    assert result.nemo_path == str(tmp_path / "run" / "final.nemo")
    with tarfile.open(result.nemo_path) as tar:
        members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        artifacts = {
            name.partition("_")[2]: tar.extractfile(m).read()
            for name, m in members.items()
            if name.endswith((".json", ".txt"))
        }
    assert artifacts == {
        "vocab.json": files.vocab_file.read_bytes(),
        "merges.txt": files.merge_file.read_bytes(),
    }
    with open_nemo(source) as before, open_nemo(result.nemo_path) as after:
        assert after.tokenizer.library == "megatron" and after.tokenizer.type == "GPT2BPETokenizer"
        assert after.model_config == before.model_config
        old, new = before.full_state_dict(), after.full_state_dict()
        assert sorted(old) == sorted(new)
        moved = [k for k in old if torch.is_tensor(old[k]) and not torch.equal(old[k], new[k])]
        assert moved  # one optimizer step changed the weights that were exported


def test_kto_with_one_example_per_micro_batch_fails_before_training(tmp_path):
    data = DataConfig(micro_batch_size=1, global_batch_size=4)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 2"):
        train(T.run_config(tmp_path, "kto", data=data))


def test_a_malformed_record_stops_the_run_naming_file_and_line(dist_ctx, tmp_path):
    from align_data import DataError

    bad = tmp_path / "train.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3}\n'
    )
    data = DataConfig(train_files=(str(bad),), micro_batch_size=1, global_batch_size=1)
    with pytest.raises(DataError, match=r"train\.jsonl:2"):
        train(T.run_config(tmp_path / "run", data=data))


def _synthetic(num_train, mbs=4, gbs=8):
    from align_core.trainer import SyntheticConfig

    return DataConfig(
        micro_batch_size=mbs,
        global_batch_size=gbs,
        synthetic=SyntheticConfig(num_train=num_train, num_validation=8),
    )


def test_kto_precomputed_reference_matches_swap_over_two_epochs(dist_ctx, tmp_path):
    from align_core.trainer import ReferenceConfig, TrainerConfig

    # 8 prompts -> 16 unpaired examples -> 2 steps per epoch; the KL pairs change each epoch.
    trainer = TrainerConfig(max_epochs=2, val_check_interval=0, save_interval=0)
    sinks = {}
    for strategy in ("precompute", "swap"):
        sinks[strategy] = InMemorySink()
        result = train(
            T.run_config(
                tmp_path / strategy,
                "kto",
                data=_synthetic(8),
                trainer=trainer,
                reference=ReferenceConfig(strategy=strategy),
                export_nemo=False,
            ),
            sinks=[sinks[strategy]],
        )
        assert result.steps == 4 and result.reference_strategy == strategy
    pre, swap = sinks["precompute"], sinks["swap"]
    assert pre.series("epoch") == [1.0, 1.0, 2.0, 2.0]
    for key in ("loss", "kl", "rewards_margin"):
        assert pre.series(key) == pytest.approx(swap.series(key), rel=1e-5, abs=1e-6), key
    caches = list((tmp_path / "precompute" / "reference_cache").iterdir())
    assert len(caches) == 1  # the train split (no validation run)


def test_lora_run_trains_only_adapters_against_the_disabled_adapter_reference(dist_ctx, tmp_path):
    from align_core.lora import LoraConfig
    from align_core.trainer import TrainerConfig

    sink = InMemorySink()
    result = train(
        T.run_config(
            tmp_path,
            data=_synthetic(16),
            trainer=TrainerConfig(max_steps=2, val_check_interval=0, save_interval=0),
            peft=LoraConfig(rank=4, alpha=8.0),
        ),
        sinks=[sink],
    )
    assert result.reference_strategy == "adapters" and result.steps == 2
    assert sink.series("preference_loss")[0] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert sink.series("rewards_margin")[1] != 0.0  # the adapters moved the policy
    with open_nemo(result.nemo_path) as ckpt:  # merged on export: a plain GPT checkpoint
        assert not any("lora" in k for k in ckpt.full_state_dict())
