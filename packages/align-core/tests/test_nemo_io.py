"""Loading `.nemo` files into megatron models and writing them back (single process, CPU)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from align_core import ModelConfig, build_gpt_model
from align_core.nemo import (
    NemoFormatError,
    nemo_config_from_model,
    open_nemo,
    random_state_dict,
    save_nemo,
    write_archive,
    write_nemo,
    write_tiny_nemo,
)
from align_core.nemo.weights import shard_for_model
from align_core.spec_keys import local_to_te

GPT = ModelConfig(
    vocab_size=300,
    normalization="LayerNorm",
    activation="gelu",
    bias=True,
    position_embedding_type="learned_absolute",
    share_embeddings_and_output_weights=True,
    seq_length=64,
)
LLAMA = ModelConfig(vocab_size=300, num_query_groups=2, seq_length=64)

COLUMN = (
    "linear_qkv.weight",
    "linear_qkv.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
    "word_embeddings.weight",
    "output_layer.weight",
)
ROW = ("linear_proj.weight", "linear_fc2.weight")


def hand_split(full: dict, tp: int, gated: bool) -> list[dict]:
    """TP shards written out index by index, independently of align_core.nemo.shards."""
    shards: list[dict] = [{} for _ in range(tp)]
    for key, value in full.items():
        for r in range(tp):
            if value is None:
                shards[r][key] = None
            elif gated and key.endswith(("linear_fc1.weight", "linear_fc1.bias")):
                ffn = value.shape[0] // 2
                per = ffn // tp
                gate = value[r * per : (r + 1) * per]
                up = value[ffn + r * per : ffn + (r + 1) * per]
                shards[r][key] = torch.cat([gate, up]).clone()
            elif key.endswith(COLUMN):
                per = value.shape[0] // tp
                shards[r][key] = value[r * per : (r + 1) * per].clone()
            elif key.endswith(ROW):
                per = value.shape[1] // tp
                shards[r][key] = value[:, r * per : (r + 1) * per].clone()
            else:
                shards[r][key] = value.clone()
    return shards


def logits_of(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, 16), generator=gen)
    pos = torch.arange(16).expand(2, 16)
    mask = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), 1)
    model.eval()
    with torch.no_grad():
        return model(ids, pos, mask)


def reference_logits(cfg: ModelConfig, seed: int) -> torch.Tensor:
    model = build_gpt_model(cfg.replace(vocab_size=384))
    model.load_state_dict(random_state_dict(cfg, seed=seed))
    return logits_of(model, cfg.vocab_size)


def load(path: Path, tp: int = 1) -> tuple[torch.nn.Module, ModelConfig]:
    from align_core.nemo import load_nemo_weights

    with open_nemo(path) as ckpt:
        cfg = ckpt.model_config_for(tp)
        model = build_gpt_model(cfg)
        load_nemo_weights(model, ckpt)
    return model, cfg


def write_sharded(
    path: Path, cfg: ModelConfig, grid: dict[str, dict], tp: int, pp: int, prefix: str
) -> Path:
    staging = path.parent / (path.name + ".d")
    staging.mkdir()
    nemo_cfg = nemo_config_from_model(cfg, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    (staging / "model_config.yaml").write_text(yaml.safe_dump(nemo_cfg))
    for directory, state in grid.items():
        (staging / directory).mkdir()
        torch.save(
            {prefix + k: v for k, v in state.items()}, staging / directory / "model_weights.ckpt"
        )
    return write_archive(staging, path)


def test_random_state_dict_matches_megatron(dist_ctx):
    for cfg in (GPT, LLAMA):
        model_sd = build_gpt_model(cfg).state_dict()
        ours = random_state_dict(cfg)
        assert list(ours) == list(model_sd)
        for key, value in ours.items():
            assert (value is None) == (model_sd[key] is None), key
            if value is not None:
                assert value.shape == model_sd[key].shape, key


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama"])
def test_round_trip_is_byte_identical(dist_ctx, tmp_path, cfg):
    src = write_tiny_nemo(tmp_path / "a.nemo", cfg, seed=11)
    with open_nemo(src) as ckpt:
        from align_core.nemo import load_nemo_weights

        model = build_gpt_model(ckpt.model_config)
        load_nemo_weights(model, ckpt)
        assert ckpt.model_config.vocab_size == 384  # the saved (padded) embedding rows
        out = save_nemo(model, tmp_path / "b.nemo", ckpt.model_config, tokenizer=ckpt.tokenizer)
    with tarfile.open(src) as a, tarfile.open(out) as b:
        assert a.getnames() == b.getnames()
        wa = a.extractfile("./model_weights.ckpt").read()
        wb = b.extractfile("./model_weights.ckpt").read()
    assert wa == wb
    assert src.read_bytes() == out.read_bytes()
    # and the weights are the ones the file was written from
    loaded = torch.load(io.BytesIO(wb), weights_only=True)
    for key, value in random_state_dict(cfg, seed=11).items():
        if value is not None:
            assert torch.equal(loaded["model." + key], value), key


@pytest.mark.parametrize("prefix", ["model.", "", "model.module."])
def test_legacy_tp_shards_merge_to_full_model_logits(dist_ctx, tmp_path, prefix):
    cfg = LLAMA if prefix != "" else GPT
    full = random_state_dict(cfg, seed=5)
    shards = hand_split(full, 2, cfg.gated)
    path = write_sharded(
        tmp_path / "tp2.nemo",
        cfg,
        {f"mp_rank_{r:02d}": s for r, s in enumerate(shards)},
        2,
        1,
        prefix,
    )
    model, _ = load(path)
    torch.testing.assert_close(logits_of(model, 300), reference_logits(cfg, 5), rtol=0, atol=0)


def test_legacy_tp_pp_shards_merge_to_full_model_logits(dist_ctx, tmp_path):
    cfg = LLAMA.replace(num_layers=4)
    full = random_state_dict(cfg, seed=9)

    def stage(layers: range, first: bool, last: bool) -> dict:
        out = {}
        for key, value in full.items():
            if key.startswith("decoder.layers."):
                index = int(key.split(".")[2])
                if index in layers:
                    out[key.replace(f"layers.{index}.", f"layers.{index - layers[0]}.")] = value
            elif (key.startswith("embedding.") and first) or (
                not key.startswith("embedding.") and last
            ):
                out[key] = value
        return out

    stages = [stage(range(0, 2), True, False), stage(range(2, 4), False, True)]
    grid = {
        f"tp_rank_{t:02d}_pp_rank_{p:03d}": hand_split(s, 2, cfg.gated)[t]
        for p, s in enumerate(stages)
        for t in range(2)
    }
    path = write_sharded(tmp_path / "tp2pp2.nemo", cfg, grid, 2, 2, "model.")
    model, _ = load(path)
    torch.testing.assert_close(logits_of(model, 300), reference_logits(cfg, 9), rtol=0, atol=0)


def test_distributed_checkpoint_layout_round_trip(dist_ctx, tmp_path):
    src = write_tiny_nemo(tmp_path / "a.nemo", LLAMA, seed=2)
    model, cfg = load(src)
    out = save_nemo(model, tmp_path / "dist.nemo", cfg, distributed=True)
    with tarfile.open(out) as tar:
        names = tar.getnames()
        config = yaml.safe_load(tar.extractfile("./model_config.yaml"))
    assert "./model_weights/metadata.json" in names
    assert "./model_weights.ckpt" not in names
    assert config["dist_ckpt_format"] == "torch_dist"
    with open_nemo(out) as ckpt:
        assert ckpt.weights.kind == "distributed"
        assert ckpt.model_config == cfg
    again, _ = load(out)
    for key, value in random_state_dict(LLAMA, seed=2).items():
        if value is not None:
            assert torch.equal(again.state_dict()[key], value), key


def test_te_keyed_checkpoint_loads_into_local_model(dist_ctx, tmp_path):
    local = random_state_dict(LLAMA, seed=4)
    te = local_to_te(local)
    te["decoder.layers.0.self_attention.core_attention._extra_state"] = io.BytesIO(b"fp8 meta")
    te["decoder.layers.0.mlp.linear_fc1._extra_state"] = io.BytesIO(b"fp8 meta")
    path = write_nemo(tmp_path / "te.nemo", te, LLAMA)
    with tarfile.open(path) as tar:
        assert yaml.safe_load(tar.extractfile("./model_config.yaml"))["transformer_engine"] is True
    model, _ = load(path)
    torch.testing.assert_close(logits_of(model, 300), reference_logits(LLAMA, 4), rtol=0, atol=0)


def test_local_checkpoint_cut_for_a_te_keyed_model(dist_ctx):
    # A TE model cannot be built without CUDA; its state-dict keys are the local ones renamed.
    full = {k: v for k, v in random_state_dict(LLAMA, seed=1).items() if v is not None}
    target = local_to_te(full)
    state, missing, unexpected = shard_for_model(
        local_to_te(full), target, tp_rank=0, tp_size=1, layer_offset=0, gated=True
    )
    assert missing == [] and unexpected == []
    assert torch.equal(
        state["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"],
        full["decoder.layers.1.input_layernorm.weight"],
    )


def test_mismatched_model_is_a_clear_error(dist_ctx, tmp_path):
    from align_core.nemo import load_nemo_weights

    path = write_tiny_nemo(tmp_path / "a.nemo", LLAMA)
    with open_nemo(path) as ckpt:
        with pytest.raises(NemoFormatError, match=r"missing \[.*linear_proj\.bias"):
            load_nemo_weights(build_gpt_model(ckpt.model_config.replace(bias=True)), ckpt)
        with pytest.raises(NemoFormatError, match="384 vocabulary rows"):
            load_nemo_weights(build_gpt_model(ckpt.model_config.replace(vocab_size=500)), ckpt)


def test_checkpoint_parameters_the_model_lacks_are_an_error(dist_ctx, tmp_path):
    from align_core.nemo import load_nemo_weights

    path = write_tiny_nemo(
        tmp_path / "gpt.nemo", GPT.replace(share_embeddings_and_output_weights=False)
    )
    with open_nemo(path) as ckpt:
        rope_tied = ckpt.model_config.replace(
            position_embedding_type="rope", share_embeddings_and_output_weights=True
        )
        with pytest.raises(
            NemoFormatError, match=r"unexpected \[.*position_embeddings.*output_layer"
        ):
            load_nemo_weights(build_gpt_model(rope_tied), ckpt)
        load_nemo_weights(build_gpt_model(rope_tied), ckpt, strict=False)


def test_vocab_padding_is_refit_for_other_tensor_parallel_sizes(dist_ctx, tmp_path):
    from align_core import padded_vocab_size

    path = write_tiny_nemo(tmp_path / "a.nemo", LLAMA)
    with open_nemo(path) as ckpt:
        assert ckpt.model_config.vocab_size == 384
        for tp in (1, 2, 4):
            cfg = ckpt.model_config_for(tp)
            assert padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp) == 384
        with pytest.raises(NemoFormatError, match="cannot be split over 5"):
            ckpt.model_config_for(5)
