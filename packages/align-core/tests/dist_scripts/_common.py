"""Helpers shared by the subprocess scripts (imported lazily inside their `main`) and by the
tests that load this module by path."""

from __future__ import annotations

import functools

import torch

VOCAB = 256
GLOBAL_BATCH = 4
SEQ = 12


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic global batch: tokens and next-token labels with an unscored prompt."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :5] = -100
    return tokens, labels


def micro_batches(tokens, labels, micro: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"tokens": tokens[i : i + micro], "labels": labels[i : i + micro]}
        for i in range(0, len(tokens), micro)
    ]


def loss_fn(batch, logps):
    """Global-batch mean of the negative summed log-prob (the schedule's loss contract)."""
    seq = logps.sum(-1)
    return -seq.sum() / GLOBAL_BATCH, {"logps": seq.detach()}


def forward(**kwargs):
    from align_core import forward_token_logps

    return functools.partial(forward_token_logps, vocab_size=VOCAB, **kwargs)


# ------------------------------------------------------------------ the production trainer


def _summed_logp_loss(normalizer, batch, logps):
    return -logps.sum() / normalizer, {}


class SummedLogpStep:
    """`loss_fn`'s objective (−Σ log-probs / global examples) as an algorithm step of the
    production `align_core.trainer.loop.Trainer`."""

    name = "summed_logp"
    needs_reference = False
    ref_shape = 0

    def normalizer(self, micro_batches, global_examples):
        return torch.tensor(float(global_examples), device=micro_batches[0]["tokens"].device)

    def loss_fn(self, normalizer):
        return functools.partial(_summed_logp_loss, normalizer)

    def finalize_metrics(self, sums):
        return {"loss": sums["loss"]}


class Steps:
    """A trainer batch source: step ``k`` gets the micro-batches ``steps[k]`` (this rank's)."""

    def __init__(self, steps, global_batch_size: int = GLOBAL_BATCH) -> None:
        self.steps = steps
        self.global_batch_size = global_batch_size
        self.train_samples = global_batch_size * len(steps)
        self.num_val_batches = 0

    def train_micro_batches(self, consumed_samples: int):
        batches = self.steps[consumed_samples // self.global_batch_size]
        return [
            {**mb, "lengths": torch.full((mb["tokens"].shape[0],), mb["tokens"].shape[1])}
            for mb in batches
        ]

    def val_micro_batches(self, index: int):
        raise IndexError(index)


def trainer(model, optimizer, steps, *, global_batch_size=GLOBAL_BATCH, lr=1e-3, clip=1.0):
    """The `Trainer` runs use, over ``steps`` (a list of per-step micro-batch lists)."""
    from align_core import module_device
    from align_core.trainer import TrainerConfig
    from align_core.trainer.loop import ParallelGroups, Trainer

    return Trainer(
        config=TrainerConfig(
            max_steps=len(steps), val_check_interval=0, save_interval=0, gradient_clip_val=clip
        ),
        algorithm=SummedLogpStep(),
        model=model,
        optimizer=optimizer,
        data=Steps(steps, global_batch_size),
        forward_fn=forward(),
        learning_rate=lambda step: lr,
        groups=ParallelGroups.from_megatron(module_device(model)),
    )


def train_step(model, optimizer, batches, **kwargs) -> dict[str, float]:
    """One optimizer step of the production trainer on ``batches`` (this rank's micro-batches).

    Returns the trainer's metrics: ``loss`` (the global-batch objective, summed over
    data-parallel ranks), ``grad_norm`` (before clipping), ``skipped_steps``, ...
    """
    return trainer(model, optimizer, [batches], **kwargs).train_step()


def trainable(seed: int, model_config=None, ddp=None, lr: float = 1e-3):
    """A tiny GPT built after ``seed_all(seed)``, in megatron DDP, and its optimizer.

    Args:
        seed: Seed of the weights.
        model_config: The `ModelConfig` (default: the default one).
        ddp: The `DDPConfig` (default: the default one).
        lr: The optimizer's learning rate (gradients clipped at norm 1).

    Returns:
        The wrapped model and its optimizer.
    """
    from align_core import (
        DDPConfig,
        ModelConfig,
        OptimizerConfig,
        build_gpt_model,
        build_optimizer,
        seed_all,
        wrap_ddp,
    )

    seed_all(seed)
    model = wrap_ddp(build_gpt_model(model_config or ModelConfig()), ddp or DDPConfig())
    return model, build_optimizer(model, OptimizerConfig(lr=lr), clip_grad=1.0)


def train_step_on(model, optimizer, data_seed: int) -> dict[str, float]:
    """`train_step` on ``data(seed=data_seed)`` in two micro-batches."""
    tokens, labels = data(seed=data_seed)
    return train_step(model, optimizer, micro_batches(tokens, labels, 2))
