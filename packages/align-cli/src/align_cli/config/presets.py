"""Presets layered under the user's overrides: the IPO/RPO commands and the built-in demo.

A preset is a partial configuration tree; it never redefines a dataclass default, it picks
values for one use (as NeMo-Aligner's example YAML files do).
"""

from __future__ import annotations

from typing import Any

__all__ = ["COMMANDS", "DEMO", "VARIANTS", "algorithm_of", "check_variant"]

from align_cli.config.schema import section_of
from align_cli.errors import ConfigError
from align_core.algorithms import REGISTRY

COMMANDS = tuple(REGISTRY)
"""What may follow ``align run`` (align-core's algorithm registry)."""

VARIANTS: dict[str, dict[str, Any]] = {
    spec.name: {"model": {spec.section: dict(spec.preset)}}
    for spec in REGISTRY.values()
    if spec.is_preset
}
"""Presets of ``align run ipo`` and ``align run rpo`` (both are DPO-family runs)."""


def _demo(algorithm: str) -> dict[str, Any]:
    return {
        "trainer": {
            section_of(algorithm): {"max_steps": 30, "val_check_interval": 5, "save_interval": 15}
        },
        "model": {
            "global_batch_size": 16,
            "micro_batch_size": 8,
            # A freshly initialised model: a much larger step than for fine-tuning.
            "optim": {"lr": 1e-3, "sched": {"warmup_steps": 5}},
            "data": {"synthetic": {"num_train": 480, "num_validation": 64}},
        },
    }


_SPIN_DEMO: dict[str, Any] = {
    # Two iterations of one epoch over 64 prompts: generate, train 4 steps, refresh, again.
    "trainer": {"spin": {"max_iterations": 2, "max_epochs": 1, "val_check_interval": 2}},
    "model": {
        "global_batch_size": 16,
        "micro_batch_size": 8,
        "optim": {"lr": 1e-3, "sched": {"warmup_steps": 2}},
        "spin": {
            "rollout_micro_batch_size": 64,
            "length_params": {"max_length": 32},
            "val_generations": 4,
        },
        "data": {"synthetic": {"num_train": 64, "num_validation": 16}},
    },
}

DEMO: dict[str, dict[str, Any]] = {
    **{spec.name: _demo(spec.name) for spec in REGISTRY.values() if not spec.is_preset},
    "spin": _SPIN_DEMO,
}
"""The built-in demo: used when neither a model nor data is given (tiny model, synthetic task).

Sized to finish in about two minutes on a 2-core CPU while held-out accuracy rises (SPIN: two
short iterations; distillation still needs a teacher)."""


def algorithm_of(command: str) -> str:
    """The configuration tree of a command: ``ipo`` and ``rpo`` are ``dpo`` runs."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    return REGISTRY[command].base


def check_variant(command: str, value: Any) -> None:
    """Refuse a value of a preset command's variant key that contradicts the command.

    A preset command (`AlgorithmSpec.is_preset`) is its base algorithm with one key fixed, its
    `AlgorithmSpec.variant_key` (``align run ipo``: ``model.dpo.preference_loss=ipo``); it
    accepts the values in its registry entry's ``preset_accepts`` (``rpo``: the three ``rpo_*``
    losses). Other commands accept anything.

    Raises:
        ConfigError: ``value`` is not one the command accepts; names the key and the command
            to use instead.
    """
    spec = REGISTRY[command]
    name = spec.variant_key
    if name is None:
        return
    accepted = spec.preset_accepts or (spec.preset[name],)
    if value in accepted:
        return
    key = f"model.{spec.section}.{name}"
    choices = f" ({', '.join(map(str, accepted))})" if len(accepted) > 1 else ""
    raise ConfigError(
        f"{key}={value} contradicts `align run {command}`{choices}; use `align run {spec.base}`",
        key=key,
    )
