"""The CUDA paths, on one GPU: Transformer Engine layers, bf16, `.nemo` loading, KV-cache decoding.

Run with ``pytest -m gpu`` (or ``python bench/gpu.py``, which runs these first). Every test is
skipped without CUDA; the Transformer Engine ones also without transformer-engine. Tiny models
only: the whole module takes seconds.

- one DPO and one KTO optimizer step of the production `Trainer` (megatron DDP, megatron Adam,
  swap reference) on the Transformer Engine spec equal the same steps on megatron's local spec
  from the same weights (fp32; tolerances allow for different kernels and TF32 in TE's GEMMs);
- a bf16 DPO step 0 (Float16Module, fp32 master weights; TE's flash attention where installed)
  has the loss ln 2 (policy = reference, so the two forwards are bitwise equal);
- a `.nemo` loaded into the TE spec gives the local spec's logits;
- greedy decoding with the KV cache equals recomputing the prefix (TE spec where installed).
"""

import math

import pytest
import torch
from _core_scripts import load_tiny

from align_core import ModelConfig, ParallelConfig, build_gpt_model, init_distributed
from align_core.algorithms import DPOConfig, KTOConfig
from align_core.algorithms.dpo import DPOStep
from align_core.algorithms.kto import KTOStep
from align_core.optim import OptimizerConfig, build_optimizer
from align_core.reference import SwapReference
from align_core.spec_keys import convert_spec
from align_core.trainer import TrainerConfig
from align_core.trainer.loop import ParallelGroups, Trainer
from align_core.training import wrap_ddp

T = load_tiny()

PAIRS = T.preference_examples(16)
UNPAIRED = T.unpaired_examples(8)


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs CUDA (no GPU visible to torch)"),
]
needs_te = pytest.mark.skipif(
    CUDA and not _te_importable(),
    reason="needs CUDA with Transformer Engine (pip install 'align-core[te]')",
)


def _pair(cfg: ModelConfig, seed: int = 1234):
    """The same weights in megatron's local spec and in the Transformer Engine spec."""
    init_distributed(ParallelConfig(), seed=seed)
    local = build_gpt_model(cfg, use_te=False)
    te = build_gpt_model(cfg, use_te=True)
    missing, unexpected = te.load_state_dict(convert_spec(local.state_dict(), "te"), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (
        missing,
        unexpected,
    )
    return local, te


def _trainer(dist_ctx, policy, step, examples, *, mbs=2, gbs=4, lr=1e-3):
    """The production `Trainer` on the GPU: DDP, megatron Adam, swap reference."""
    reference = SwapReference(policy, T.FORWARD)
    model = wrap_ddp(policy)
    optimizer = build_optimizer(model, OptimizerConfig(lr=lr, weight_decay=0.0), clip_grad=1.0)
    return Trainer(
        config=TrainerConfig(max_steps=2, val_check_interval=0, save_interval=0),
        algorithm=step,
        model=model,
        optimizer=optimizer,
        data=T.data(examples, [], step, mbs=mbs, gbs=gbs),
        forward_fn=T.FORWARD,
        learning_rate=lambda s: lr,
        groups=ParallelGroups.from_megatron(dist_ctx.device),
        reference=reference,
    )


@needs_te
@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_te_spec_steps_equal_local_spec_steps(dist_ctx, algorithm):
    if algorithm == "dpo":
        make, examples = lambda: DPOStep(DPOConfig(ref_policy_kl_penalty=0.5)), PAIRS
    else:
        make, examples = lambda: KTOStep(KTOConfig(ref_policy_kl_penalty=0.5)), UNPAIRED
    local, te = _pair(T.MODEL)
    runs = {}
    for name, policy in (("local", local), ("te", te)):
        trainer = _trainer(dist_ctx, policy, make(), examples)
        assert trainer.device.type == "cuda"
        runs[name] = [trainer.train_step() for _ in range(2)]
    for a, b in zip(runs["local"], runs["te"], strict=True):
        for key in ("loss", "grad_norm", "rewards_chosen_mean", "rewards_rejected_mean"):
            assert b[key] == pytest.approx(a[key], rel=5e-3, abs=5e-4), key
    assert runs["te"][1]["loss"] != runs["te"][0]["loss"]  # the first update changed the policy


def test_bf16_dpo_step_zero_loss_is_ln2(dist_ctx):
    init_distributed(ParallelConfig(), seed=1234)
    policy = build_gpt_model(T.MODEL.replace(dtype="bf16"))
    trainer = _trainer(dist_ctx, policy, DPOStep(DPOConfig(ref_policy_kl_penalty=0.5)), PAIRS)
    metrics = trainer.train_step()
    assert metrics["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards_margin"] == 0.0 and math.isfinite(metrics["grad_norm"])
    assert metrics["peak_memory"] > 0
    second = trainer.train_step()
    assert math.isfinite(second["loss"]) and second["loss"] != metrics["loss"]


@needs_te
def test_nemo_loaded_into_te_spec_gives_local_spec_logits(dist_ctx, tmp_path):
    from align_core.nemo import load_nemo_weights, open_nemo, write_tiny_nemo

    path = write_tiny_nemo(tmp_path / "tiny.nemo", ModelConfig(vocab_size=320), seed=3)
    logits = {}
    with open_nemo(path) as ckpt:
        cfg = ckpt.model_config_for(1)
        tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
        for use_te in (False, True):
            model = build_gpt_model(cfg, use_te=use_te).eval()
            load_nemo_weights(model, ckpt)
            device = next(model.parameters()).device
            ids = tokens.to(device)
            positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
            mask = torch.triu(
                torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool, device=device), 1
            )
            with torch.no_grad():
                logits[use_te] = model(ids, positions, mask).float()
    assert logits[True].shape == logits[False].shape
    torch.testing.assert_close(logits[True], logits[False], atol=2e-3, rtol=2e-3)


def test_kv_cache_greedy_equals_recompute(dist_ctx):
    from align_core.generation import Generator, LengthConfig, SamplingConfig

    init_distributed(ParallelConfig(), seed=0)
    cfg = ModelConfig(vocab_size=200, seq_length=64, init_method_std=0.2)
    model = build_gpt_model(cfg).eval()  # the Transformer Engine spec where it is installed
    prompts = [[5, 17, 42, 8, 99], [7, 3], [11, 12, 13, 14, 15, 16, 17, 18]]
    greedy, length = SamplingConfig(use_greedy=True), LengthConfig(max_length=12)
    cached = Generator(model, vocab_size=200, eos_ids=199).generate(prompts, greedy, length)
    plain = Generator(model, vocab_size=200, eos_ids=199, use_kv_cache=False).generate(
        prompts, greedy, length
    )
    assert torch.equal(cached.tokens.cpu(), plain.tokens.cpu())
    assert torch.equal(cached.response_lengths.cpu(), plain.response_lengths.cpu())
    torch.testing.assert_close(cached.logprobs, plain.logprobs, atol=1e-3, rtol=1e-3)
