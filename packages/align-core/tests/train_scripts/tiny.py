"""Shared helpers of the trainer/reference/learning tests: tiny data and a tiny trainer."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from align_core import ModelConfig, ParallelConfig, build_gpt_model, init_distributed
from align_core.logprobs import forward_token_logps
from align_core.optim import OptimizerConfig, build_optimizer
from align_core.trainer import TrainerConfig
from align_core.trainer.data import TrainData
from align_core.trainer.loop import ParallelGroups, Trainer
from align_core.training import wrap_ddp
from align_data import (
    ByteTokenizer,
    CollateConfig,
    PreferenceExample,
    SFTExample,
    UnpairedExample,
    generate_pairs,
)

TOK = ByteTokenizer()
MODEL = ModelConfig(vocab_size=TOK.vocab_size, seq_length=64)
COLLATE = CollateConfig(pad_id=TOK.pad_id)
FORWARD = functools.partial(forward_token_logps, vocab_size=TOK.vocab_size)


def load(name: str):
    """Import a sibling module of this file (tests run with --import-mode=importlib)."""
    path = Path(__file__).parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_align_core_tests_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ids(text: str, bos: bool = False, eos: bool = False) -> np.ndarray:
    ids = ([TOK.bos_id] if bos else []) + TOK.encode(text) + ([TOK.eos_id] if eos else [])
    return np.asarray(ids, dtype=np.int32)


def preference_examples(n: int, seed: int = 0) -> list[PreferenceExample]:
    """Tokenized pairs of align-data's synthetic task."""
    return [
        PreferenceExample(
            _ids(p.prompt, bos=True), _ids(p.chosen, eos=True), _ids(p.rejected, eos=True), index=i
        )
        for i, p in enumerate(generate_pairs(n, seed=seed))
    ]


def unpaired_examples(n: int, seed: int = 0) -> list[UnpairedExample]:
    """Each of ``n`` synthetic prompts twice: with its chosen (desirable) and its rejected
    (undesirable) response, as align-data's synthetic unpaired files hold them."""
    out = []
    for p in generate_pairs(n, seed=seed):
        for good, text in ((True, p.chosen), (False, p.rejected)):
            prompt = _ids(p.prompt, bos=True)
            out.append(UnpairedExample(prompt, _ids(text, eos=True), good, index=len(out)))
    return out


def sft_examples(n: int, seed: int = 0) -> list[SFTExample]:
    """Synthetic prompts with their chosen responses."""
    return [
        SFTExample(_ids(p.prompt, bos=True), _ids(p.chosen, eos=True), index=i)
        for i, p in enumerate(generate_pairs(n, seed=seed))
    ]


def fresh_model(seed: int = 1234, model: ModelConfig = MODEL):
    """The same initial weights for the same seed (megatron's RNG is re-seeded)."""
    init_distributed(ParallelConfig(), seed=seed)
    return build_gpt_model(model)


def data(train, val, algorithm, *, mbs: int, gbs: int, **kwargs) -> TrainData:
    """A single-process data source over example lists."""
    return TrainData(
        train, val, algorithm, COLLATE, micro_batch_size=mbs, global_batch_size=gbs, **kwargs
    )


def trainer(
    policy,
    algorithm,
    source: TrainData,
    *,
    reference=None,
    config: TrainerConfig | None = None,
    lr: float = 1e-3,
    forward=FORWARD,
    sinks=(),
) -> Trainer:
    """A Trainer over a DDP-wrapped ``policy`` (Adam, constant learning rate)."""
    import torch

    model = wrap_ddp(policy)
    optimizer = build_optimizer(model, OptimizerConfig(lr=lr, weight_decay=0.0), clip_grad=1.0)
    return Trainer(
        config=config or TrainerConfig(max_steps=3, val_check_interval=0, save_interval=0),
        algorithm=algorithm,
        model=model,
        optimizer=optimizer,
        data=source,
        forward_fn=forward,
        learning_rate=lambda step: lr,
        groups=ParallelGroups.from_megatron(torch.device("cpu")),
        reference=reference,
        sinks=sinks,
    )


def run_config(run_dir, algorithm: str = "dpo", **changes):
    """A small `RunConfig` on the synthetic task (fresh tiny model, byte tokenizer)."""
    import dataclasses

    from align_core.algorithms import DPOConfig, KTOConfig
    from align_core.optim import SchedulerConfig
    from align_core.trainer import DataConfig, ReferenceConfig, RunConfig, SyntheticConfig

    trainer = changes.pop(
        "trainer", TrainerConfig(max_steps=4, val_check_interval=2, save_interval=2)
    )
    data = changes.pop(
        "data",
        DataConfig(
            micro_batch_size=4,
            global_batch_size=8,
            synthetic=SyntheticConfig(num_train=64, num_validation=16),
        ),
    )
    base = RunConfig(
        algorithm,
        str(run_dir),
        model=MODEL,
        trainer=trainer,
        reference=ReferenceConfig(strategy="auto"),
        data=data,
        dpo=DPOConfig(ref_policy_kl_penalty=0.5),
        kto=KTOConfig(ref_policy_kl_penalty=0.5),
        optim=OptimizerConfig(lr=1e-3, weight_decay=0.0),
        sched=SchedulerConfig(style="cosine", warmup_steps=1),
    )
    return dataclasses.replace(base, **changes)
