"""`.nemo` and LoRA at TP=2 and PP=2 equal TP=1 (one 2-process torchrun launch, gloo).

The fixture prepares a `.nemo`, reference logits, LoRA adapters and their gradients at TP=1 in
this process, runs ``nemo_scripts/tp_pp_nemo.py`` under torchrun, then reads what the two ranks
wrote back at TP=1.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from _core_torchrun import run_torchrun

from align_core import ModelConfig, build_gpt_model
from align_core.lora import LoraConfig, add_lora, lora_parameters, lora_state_dict, save_lora
from align_core.nemo import load_nemo_weights, open_nemo, random_state_dict, write_tiny_nemo

SCRIPT = Path(__file__).parent / "nemo_scripts" / "tp_pp_nemo.py"
CFG = ModelConfig(vocab_size=300, num_query_groups=2, seq_length=32)
LORA = LoraConfig(rank=4, alpha=8.0)
CHECKS = [
    "tp2_load_logits",
    "tp2_save_gathered",
    "tp2_save_distributed",
    "tp2_legacy_shards",
    "tp2_lora",
    "pp2_load_logits",
    "pp2_save_gathered",
    "pp2_legacy_shards",
]

pytestmark = pytest.mark.distributed


def _load(path: Path) -> torch.nn.Module:
    with open_nemo(path) as ckpt:
        model = build_gpt_model(ckpt.model_config_for(1))
        load_nemo_weights(model, ckpt)
    return model.eval()


def _logits(model: torch.nn.Module, ref: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ref["ids"], ref["pos"], ref["mask"])


@pytest.fixture(scope="module")
def run(dist_ctx, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    work = tmp_path_factory.mktemp("tp_pp_nemo")
    write_tiny_nemo(work / "src.nemo", CFG, seed=21)
    gen = torch.Generator().manual_seed(0)
    ref: dict = {
        "ids": torch.randint(0, CFG.vocab_size, (2, 12), generator=gen),
        "pos": torch.arange(12).expand(2, 12).clone(),
        "mask": torch.triu(torch.ones(1, 1, 12, 12, dtype=torch.bool), 1),
        "lora": dataclasses.asdict(LORA),
    }
    model = _load(work / "src.nemo")
    ref["logits"] = _logits(model, ref)
    add_lora(model, LORA)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ref["adapted"] = _logits(model, ref)
    ref["loss_weight"] = torch.randn(ref["adapted"].shape, generator=gen)
    model.train()
    (model(ref["ids"], ref["pos"], ref["mask"]) * ref["loss_weight"]).sum().backward()
    ref["grads"] = {
        k: v.grad.clone()
        for k, v in zip(lora_state_dict(model), lora_parameters(model), strict=True)
    }
    save_lora(model, work / "adapters.pt", LORA)
    torch.save(ref, work / "ref.pt")

    proc = run_torchrun(SCRIPT, work, timeout=560)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return work, ref, [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("check", CHECKS)
def test_check_passed_on_both_ranks(run, check):
    _, _, outcomes = run
    for rank, outcome in enumerate(outcomes):
        assert check in outcome, f"rank {rank} did not run {check}"
        assert outcome[check] is None, f"rank {rank}:\n{outcome[check]}"


@pytest.mark.parametrize("name", ["tp2_gathered.nemo", "pp2_gathered.nemo"])
def test_gathered_export_equals_the_source_weights(run, name):
    work, _, _ = run
    with open_nemo(work / "src.nemo") as src, open_nemo(work / name) as out:
        a, b = src.full_state_dict(), out.full_state_dict()
        assert a.keys() == b.keys()
        for key in a:
            if a[key] is not None:
                assert torch.equal(a[key], b[key]), key
        assert (
            out.tokenizer is None
            or out.tokenizer.vocab_file.read_bytes() == src.tokenizer.vocab_file.read_bytes()
        )


@pytest.mark.parametrize("name", ["tp2_dist.nemo", "pp2_legacy.nemo"])
def test_parallel_saves_load_at_tp1(run, name):
    work, ref, _ = run
    torch.testing.assert_close(_logits(_load(work / name), ref), ref["logits"], rtol=0, atol=0)


def test_megatron_native_tp2_shards_merge_at_tp1(run):
    work, ref, _ = run
    want = torch.load(work / "tp2_legacy_logits.pt", weights_only=True)
    torch.testing.assert_close(
        _logits(_load(work / "tp2_legacy.nemo"), ref), want, rtol=1e-5, atol=1e-5
    )
    # a different model from the source: the comparison is not trivially satisfied
    assert not torch.allclose(want, ref["logits"], atol=1e-3)


def test_adapters_saved_at_tp2_equal_tp1(run):
    work, _, _ = run
    a = torch.load(work / "adapters.pt", weights_only=True)["state_dict"]
    b = torch.load(work / "tp2_adapters.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reference_weights_were_random(run):
    work, _, _ = run
    with open_nemo(work / "src.nemo") as src:
        state = src.full_state_dict()
    expected = random_state_dict(CFG, seed=21)
    assert all(torch.equal(state[k], v) for k, v in expected.items() if v is not None)
