"""A `.nemo` whose config lies about sizes is refused before anything is built.

Each case edits ``model_config.yaml`` of a small valid archive (2 layers, hidden 64, 4 heads,
FFN 256, SwiGLU) and expects one `NemoFormatError` naming the key and both values, without
building a model (so no hang and no allocation). Both the single-file and the distributed
(``model_weights/``, layers stacked) layouts are checked.
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import pytest
import yaml

from align_core import ModelConfig
from align_core.nemo import NemoFormatError, open_nemo, write_archive, write_tiny_nemo

MODEL = ModelConfig(vocab_size=320, seq_length=64)


def _lying_copy(source: Path, out: Path, **changes: object) -> Path:
    staging = out.with_suffix(".d")
    with tarfile.open(source) as tar:
        tar.extractall(staging, filter="data")
    config_path = staging / "model_config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config.update(changes)
    config_path.write_text(yaml.safe_dump(config))
    return write_archive(staging, out)


@pytest.fixture(scope="module")
def tiny_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_nemo(tmp_path_factory.mktemp("sizes") / "tiny.nemo", MODEL)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_layers", 1_000_000_000, "num_layers=1000000000, but the weights hold 2 layers"),
        ("hidden_size", 10_000_000, "hidden_size=10000000, but the stored"),
        ("ffn_hidden_size", 128, "ffn_hidden_size=128, but the stored"),
        ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
        ("num_layers", 0, "num_layers must be a positive integer, got 0"),
        ("hidden_size", -64, "hidden_size must be a positive integer, got -64"),
        ("num_query_groups", 2, "num_query_groups=2, kv_channels=16 (128 q/k/v rows)"),
    ],
)
def test_lying_sizes_are_refused_in_one_line(tiny_nemo, tmp_path, key, value, message):
    lying = _lying_copy(tiny_nemo, tmp_path / "lying.nemo", **{key: value})
    start = time.perf_counter()
    with pytest.raises(NemoFormatError) as info, open_nemo(lying):
        pass
    text = str(info.value)
    assert str(lying) in text and "\n" not in text
    assert message in text, text
    assert time.perf_counter() - start < 30


def test_distributed_layout_is_checked_with_its_stacked_layers(dist_ctx, tmp_path):
    from align_core import build_gpt_model
    from align_core.nemo import save_nemo

    model = build_gpt_model(MODEL, device="cpu")
    dist = save_nemo(model, tmp_path / "dist.nemo", MODEL, distributed=True)
    with open_nemo(dist) as ckpt:
        assert ckpt.model_config.num_layers == 2
    lying = _lying_copy(dist, tmp_path / "lying.nemo", num_layers=3)
    refused = "num_layers=3, but the weights hold 2 layers"
    with pytest.raises(NemoFormatError, match=refused), open_nemo(lying):
        pass
