"""Hostile checkpoints run no code: a corpus of poisoned distributed checkpoints, built here.

Each poisoned file holds a pickle whose payload would create a marker file. The corpus covers
the three places a megatron distributed checkpoint keeps pickles: the ``.metadata`` file (as a
whole, or a payload nested inside otherwise valid metadata), a sharded object inside a
``.distcp`` file, and ``common.pt``. Every path that reads a checkpoint is tried: the library
readers in-process, then the ``align`` commands (inspect, restore, generate, KD teacher on a
``.nemo``; resume and export on a run's ``checkpoints/step_*``). No payload may run; each
command exits 2 with one line naming the file and the refused class, no traceback.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

BYTES_KEY = "model.decoder.layers.self_attention.linear_proj._extra_state/shard_0_2"
VALID_BYTES = (
    "model.decoder.layers.mlp.linear_fc1._extra_state/shard_0_2"  # a harmless sharded object
)


class WritesFile:
    """Unpickling this object calls ``exec`` and creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('ran')",))


def _serialized(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_distributed_checkpoint(
    directory: Path, marker: Path, poison: str, *, prefix: str = "model.", rows: int = 384
) -> Path:
    """A torch distributed checkpoint of one embedding, poisoned at ``poison``.

    ``poison``: ``"none"``, ``"metadata"`` (the whole ``.metadata`` is the payload),
    ``"nested"`` (valid metadata with the payload in ``planner_data``), ``"bytes"`` (a sharded
    object in ``__0_0.distcp``) or ``"common"`` (``common.pt``).
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    directory.mkdir(parents=True, exist_ok=True)
    embedding = f"{prefix}embedding.word_embeddings.weight"
    tensor = torch.zeros(rows, 64)
    blobs = {
        embedding: _serialized(tensor),
        f"{prefix}{VALID_BYTES[6:]}": _serialized(io.BytesIO(b"")),
        f"{prefix}{BYTES_KEY[6:]}": _serialized(WritesFile(marker) if poison == "bytes" else []),
    }
    state_metadata: dict[str, object] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    offset = 0
    with (directory / "__0_0.distcp").open("wb") as handle:
        for key, blob in blobs.items():
            handle.write(blob)
            if key == embedding:
                chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=tensor.size())
                state_metadata[key] = TensorStorageMetadata(
                    TensorProperties(dtype=torch.float32), tensor.size(), [chunk]
                )
                index = MetadataIndex(key, torch.Size([0, 0]))
            else:
                state_metadata[key] = BytesStorageMetadata()
                index = MetadataIndex(key)
            storage[index] = _StorageInfo("__0_0.distcp", offset, len(blob))
            offset += len(blob)
    metadata = Metadata(state_dict_metadata=state_metadata, storage_data=storage)
    if poison == "nested":
        metadata.planner_data = WritesFile(marker)
    payload = WritesFile(marker) if poison == "metadata" else metadata
    (directory / ".metadata").write_bytes(pickle.dumps(payload))
    common = {"sharded_backend": "torch_dist"}
    if poison == "common":
        common["evil"] = WritesFile(marker)
    torch.save(common, directory / "common.pt")
    (directory / "metadata.json").write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    )
    return directory


def write_nemo(path: Path, marker: Path, poison: str) -> Path:
    """A ``.nemo`` of a tiny GPT whose ``model_weights/`` is the (poisoned) checkpoint."""
    staging = path.parent / f"{path.stem}-staging"
    write_distributed_checkpoint(staging / "model_weights", marker, poison)
    config = {
        "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 256, "num_attention_heads": 4,
        "encoder_seq_length": 256, "max_position_embeddings": 256, "mcore_gpt": True,
        "position_embedding_type": "rope", "normalization": "rmsnorm", "activation": "swiglu",
        "bias": False, "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 128, "tokenizer": {"library": "byte-level"},
    }  # fmt: skip
    (staging / "model_config.yaml").write_text(json.dumps(config))
    with tarfile.open(path, "w") as archive:
        for member in sorted(staging.rglob("*")):
            archive.add(member, arcname=f"./{member.relative_to(staging)}", recursive=False)
    shutil.rmtree(staging)
    return path


POISONS = ("metadata", "nested", "bytes", "common")
REFUSED_CLASS = "builtins.exec"


@pytest.mark.parametrize("poison", POISONS)
def test_library_readers_refuse_every_poison(tmp_path: Path, poison: str) -> None:
    from align_core.nemo.weights import stored_tensors
    from align_core.safe_load import UnsafeCheckpointError, verify_distributed_checkpoint

    marker = tmp_path / "ran"
    directory = write_distributed_checkpoint(tmp_path / "ckpt", marker, poison)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED_CLASS) as info:
        verify_distributed_checkpoint(directory)
    where = {"metadata": ".metadata", "nested": ".metadata", "bytes": "__0_0.distcp"}
    assert where.get(poison, "common.pt") in str(info.value)
    if poison in ("metadata", "nested"):
        with pytest.raises(UnsafeCheckpointError, match=REFUSED_CLASS):
            stored_tensors(directory)
    assert not marker.exists()


def test_a_clean_checkpoint_passes_and_the_payload_would_have_run(tmp_path: Path) -> None:
    """The corpus is live: an unrestricted reader runs the payload (so the refusals mean it)."""
    from align_core.safe_load import verify_distributed_checkpoint

    marker = tmp_path / "ran"
    clean = write_distributed_checkpoint(tmp_path / "clean", marker, "none")
    metadata = verify_distributed_checkpoint(clean)
    assert f"model.{BYTES_KEY[6:]}" in metadata.state_dict_metadata
    poisoned = write_distributed_checkpoint(tmp_path / "poisoned", marker, "metadata")
    pickle.loads((poisoned / ".metadata").read_bytes())
    assert marker.read_text() == "ran"


def test_checkpoint_files_refuse_pickles_and_admit_empty_extra_state(tmp_path: Path) -> None:
    from align_core.nemo.weights import read_checkpoint_file
    from align_core.safe_load import UnsafeCheckpointError

    marker = tmp_path / "ran"
    good = tmp_path / "good.ckpt"
    # An empty BytesIO is what an unused Transformer Engine _extra_state pickles to (bytes).
    torch.save({"model.decoder.x._extra_state": io.BytesIO(b""), "w": torch.ones(2)}, good)
    assert torch.equal(read_checkpoint_file(good)["w"], torch.ones(2))
    bad = tmp_path / "bad.ckpt"
    torch.save({"w": torch.ones(2), "x": WritesFile(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError, match=f"bad.ckpt.*{REFUSED_CLASS}"):
        read_checkpoint_file(bad)
    assert not marker.exists()


# ------------------------------------------------------------------------- the align command


def _assert_refused(result, marker: Path, file_part: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert not marker.exists(), "the payload ran"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and REFUSED_CLASS in lines[0], lines[0]
    assert file_part in lines[0], lines[0]


def nemo_command(command: str, nemo: Path, root: Path) -> list[str]:
    """The arguments of ``align`` that read ``nemo`` for one of the commands."""
    data = f"model.data.data_prefix={{train: [{root / 'sft.jsonl'}]}}"
    return {
        "inspect": ["ckpt", "inspect", str(nemo)],
        "restore": ["run", "dpo", "--restore", str(nemo), "trainer.dpo.max_steps=1"],
        "generate": ["generate", "--restore", str(nemo), str(root / "prompts.jsonl")],
        "kd-teacher": [
            *("kd", "teacher", "--restore", str(nemo), "top_k=4", data),
            f"output={root / 'teacher'}",
        ],
    }[command]


# Which poison each command meets: every command, and every poison, at least once. ``inspect``
# reads only the metadata; the others load the weights.
NEMO_CASES = [("inspect", "nested"), ("restore", "bytes"), ("generate", "metadata")]
NEMO_CASES += [("kd-teacher", "common")]


@pytest.mark.slow
@pytest.mark.parametrize(("command", "poison"), NEMO_CASES)
def test_commands_refuse_a_poisoned_nemo(tmp_path: Path, align, command: str, poison: str) -> None:
    marker = tmp_path / "ran"
    nemo = write_nemo(tmp_path / "evil.nemo", marker, poison)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hello"}\n')
    (tmp_path / "sft.jsonl").write_text('{"prompt": "Hi", "completion": "Hello."}\n' * 8)
    result = align(*nemo_command(command, nemo, tmp_path), cwd=tmp_path, check=False)
    _assert_refused(result, marker, "evil.nemo")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, align) -> Path:
    """A 2-step demo DPO run with a checkpoint at step 2."""
    run_dir = tmp_path_factory.mktemp("hostile-run") / "run"
    align(
        "run", "dpo", "-q", "trainer.dpo.max_steps=2", "trainer.dpo.save_interval=2",
        "trainer.dpo.val_check_interval=0", "model.data.synthetic.num_train=16",
        "model.data.synthetic.num_validation=8", "model.global_batch_size=8",
        "model.micro_batch_size=4",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
        f"exp_manager.explicit_log_dir={run_dir}", cwd=run_dir.parent,
    )  # fmt: skip
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(("command", "poison"), [("resume", "metadata"), ("export", "bytes")])
def test_commands_refuse_a_poisoned_run_checkpoint(
    tmp_path: Path, align, finished_run: Path, command: str, poison: str
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    marker = tmp_path / "ran"
    step = run_dir / "checkpoints" / "step_000002"
    assert step.is_dir()
    poisoned = write_distributed_checkpoint(tmp_path / "poison", marker, poison, prefix="")
    for name in (".metadata", "__0_0.distcp", "common.pt"):
        shutil.copy(poisoned / name, step / name)
    if command == "resume":
        args = [
            "run", "dpo", "--resume", "trainer.dpo.max_steps=3",
            f"exp_manager.explicit_log_dir={run_dir}",
        ]  # fmt: skip
    else:
        args = ["ckpt", "export", str(run_dir), "--out", str(tmp_path / "out.nemo")]
    result = align(*args, cwd=tmp_path, check=False)
    _assert_refused(result, marker, "step_000002")
