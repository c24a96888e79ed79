"""Optimizer state offload (SPIN's generation phase): the round trip is bit-exact.

`offload_optimizer_state(source="cpu")` copies host tensors into fresh host tensors, which is the
whole CUDA round trip except the kind of memory: the same tensors are chosen, swapped and
restored, so what is tested here is what runs on a GPU.
"""

import sys
from pathlib import Path

import pytest
import torch

from align_core import DDPConfig, ModelConfig
from align_core.generation.offload import (
    inner_optimizers,
    offload_optimizer_state,
    optimizer_state_offloaded,
    restore_optimizer_state,
)

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
import _common as c

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = {
    "fp32": (ModelConfig(), DDPConfig()),
    "fp32-distributed": (ModelConfig(), DDPConfig(use_distributed_optimizer=True)),
    "bf16": (ModelConfig(dtype="bf16"), DDPConfig()),
}


def _trained(layout: str, steps: int = 1):
    cfg, ddp = LAYOUTS[layout]
    model, optimizer = c.trainable(7, cfg, ddp, lr=1e-2)
    for seed in range(steps):
        c.train_step_on(model, optimizer, seed)
    return model, optimizer


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _owned(optimizer):
    """Every tensor the inner optimizers hold: (kind, param object, key, tensor)."""
    out = []
    for opt in inner_optimizers(optimizer):
        for group in opt.param_groups:
            out.extend(("param", p, None, p.data) for p in group["params"])
        for p, state in opt.state.items():
            out.extend(("state", p, k, v) for k, v in state.items() if torch.is_tensor(v))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_is_bit_exact_and_moves_only_the_optimizers_own_tensors(dist_ctx, layout):
    model, optimizer = _trained(layout)
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model_bits = {n: _bits(p) for n, p in model.named_parameters()}
    owned = _owned(optimizer)
    before = [(kind, p, key, t, _bits(t)) for kind, p, key, t in owned]
    groups = [list(g["params"]) for opt in inner_optimizers(optimizer) for g in opt.param_groups]

    offloaded = offload_optimizer_state(optimizer, model, source="cpu")

    moved_params = {id(p) for p, _ in offloaded.params}
    moved_states = {(id(s), k) for s, k, _ in offloaded.states}
    # Adam's moments always move; master weights move where they are the optimizer's own
    # (bf16: fp32 copies), never where they are the model's parameters or views of them.
    assert sum(1 for _, _, k, _ in owned if k in ("exp_avg", "exp_avg_sq")) == 2 * len(
        list(model.parameters())
    )
    assert len(moved_states) == sum(1 for kind, *_ in owned if kind == "state")
    expected_params = [p for kind, p, _, t in owned if kind == "param"]
    if layout == "bf16":
        assert len(moved_params) == len(expected_params) > 0
    else:
        assert not moved_params  # the model's parameters (fp32) or views of their buffer
    assert offloaded.num_bytes > 0
    for kind, p, key, t, bits in before:
        now = p.data if kind == "param" else _state_of(optimizer, p)[key]
        moved = id(p) in moved_params if kind == "param" else True
        if moved:
            assert now.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        assert now.untyped_storage().data_ptr() not in model_storages or not moved
        assert torch.equal(_bits(now), bits)
    for name, p in model.named_parameters():
        assert torch.equal(_bits(p), model_bits[name]), name

    restore_optimizer_state(offloaded)

    after = [list(g["params"]) for opt in inner_optimizers(optimizer) for g in opt.param_groups]
    pairs = [
        (a, b) for ga, gb in zip(groups, after, strict=True) for a, b in zip(ga, gb, strict=True)
    ]
    assert all(a is b for a, b in pairs)
    for kind, p, key, _, bits in before:
        now = p.data if kind == "param" else _state_of(optimizer, p)[key]
        assert torch.equal(_bits(now), bits), (kind, key)


def _state_of(optimizer, p):
    for opt in inner_optimizers(optimizer):
        if p in opt.state:
            return opt.state[p]
    raise KeyError(p)


@pytest.mark.parametrize("layout", ["fp32-distributed", "bf16"])
def test_training_after_a_round_trip_equals_training_without_one(dist_ctx, layout):
    model, optimizer = _trained(layout)
    twin, twin_optimizer = _trained(layout)
    restore_optimizer_state(offload_optimizer_state(optimizer, model, source="cpu"))
    a, b = c.train_step_on(model, optimizer, 5), c.train_step_on(twin, twin_optimizer, 5)
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(_bits(p), _bits(q)), name


def test_the_context_manager_is_a_no_op_without_cuda(dist_ctx):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    model, optimizer = _trained("fp32")
    before = [(p, k, v.untyped_storage().data_ptr()) for _, p, k, v in _owned(optimizer)]
    with optimizer_state_offloaded(optimizer, model) as offloaded:
        assert offloaded is None
    after = [(p, k, v.untyped_storage().data_ptr()) for _, p, k, v in _owned(optimizer)]
    assert len(before) == len(after) > 0
    for (p, k, v), (q, m, w) in zip(before, after, strict=True):
        assert p is q and k == m and v == w
