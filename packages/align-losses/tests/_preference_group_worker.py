"""Worker for the 2-process gloo test of ``bco_reward_mean`` and ``wpo_token_adjustment``.

Every rank builds the same tensors from one seed, keeps its own share (its rows of the
rewards, an uneven slice of the vocabulary), runs the grouped call and compares it with the
single-process call on the full tensors; the outcome is saved to ``rank<r>.pt``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from align_losses import bco_reward_mean, wpo_token_adjustment


def run(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        gen = torch.Generator().manual_seed(0)
        chosen = torch.randn(world, 3, generator=gen, dtype=torch.float64)
        rejected = torch.randn(world, 3, generator=gen, dtype=torch.float64)
        state = bco_reward_mean(None, chosen[rank], rejected[rank], group=dist.group.WORLD)
        logits = 2 * torch.randn(4, 10, generator=gen, dtype=torch.float64)
        bounds = [0, 4, 10]
        local = logits[:, bounds[rank] : bounds[rank + 1]]
        adj = wpo_token_adjustment(local, group=dist.group.WORLD)
        ok = torch.allclose(state.mean, torch.cat([chosen, rejected]).mean(), atol=1e-14)
        ok &= state.count.item() == 2 * 3 * world
        ok &= torch.allclose(adj, wpo_token_adjustment(logits), atol=1e-12)
        torch.save(bool(ok), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
