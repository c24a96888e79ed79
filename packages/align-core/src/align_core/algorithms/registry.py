"""One registry of the algorithms: every fact about an algorithm name, in one place.

Each ``align run <name>`` command has one `AlgorithmSpec`: its configuration class and section,
the step the shared training loop builds (`align_core.algorithms.contract.AlgorithmStep`), the
kind of data it reads, how many sequences one example holds, how packing and the reference
forward count it, whether it needs a reference policy (computed from its configuration), its
preset (IPO and RPO are presets of the DPO step) and its help line. The trainer, the CLI's
configuration trees, presets and help, and the dry-run plan read it instead of keeping tables
keyed by algorithm name.

Distillation (``kd``) lives in align-kd, which align-core never imports: its entry holds only
what applies without its classes (no configuration class, no step factory).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from align_core.algorithms.contract import AlgorithmStep
from align_core.algorithms.dpo import DPOConfig, DPOStep
from align_core.algorithms.kto import KTOConfig, KTOStep
from align_core.algorithms.sft import SFTConfig, SFTStep
from align_core.algorithms.spin import SPINConfig

__all__ = ["REGISTRY", "AlgorithmSpec", "DataKind", "get_algorithm"]

DataKind = Literal["preference", "unpaired", "sft"]
"""align-data's record kinds (`align_data.PreprocessConfig.kind`)."""

StepFactory = Callable[[Any, Any], AlgorithmStep]
"""``(config, data_parallel_group) -> step``."""


def _always(_config: Any) -> bool:
    return True


def _never(_config: Any) -> bool:
    return False


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the toolkit knows about one algorithm (one ``align run`` command).

    Attributes:
        name: The command (``dpo``, ``ipo``, ``rpo``, ``kto``, ``sft``, ``spin``, ``kd``).
        base: The algorithm it runs as (`align_core.trainer.RunConfig.algorithm`, and the
            configuration tree): ``dpo`` for ``ipo`` and ``rpo``, else ``name``.
        config_class: Its settings dataclass (``model.<section>``); None where it lives in a
            package align-core does not import (``kd``).
        step_factory: ``(config, data_group) -> AlgorithmStep`` for the shared training loop;
            None for algorithms with their own session (``spin``, ``kd``).
        data_kind: The records it reads (align-data's ``preference``/``unpaired``/``sft``);
            the collate is the step's ``build_micro_batch``.
        sequences_per_example: Sequences one example puts through the model (2 for a pair, 2
            for a KTO sample and its KL sample).
        pack_factor: Rows of ``seq_length`` one packed example may need (the default pack
            size is ``pack_factor × seq_length``); None where packing is not supported.
        reference_unit: What one example counts in ``log_prob_forward_micro_batch_size`` (1:
            that size counts examples, 2: it counts the example's two sequences); 0 without
            such a setting.
        needs_reference: ``(config) -> bool``: whether a run with this configuration needs
            reference log-probs (a reference pass or policy).
        per_epoch_reference: The reference log-probs change per epoch (KTO's KL samples are
            re-drawn), so a precomputed cache holds one row per example per epoch.
        section: The ``trainer.<section>`` / ``model.<section>`` name.
        preset: Values of ``config_class`` fields this command sets (its preset); empty for
            a base algorithm.
        help: The one-line help of ``align run <name>``.
    """

    name: str
    base: str
    config_class: type | None
    step_factory: StepFactory | None
    data_kind: DataKind
    sequences_per_example: int
    pack_factor: int | None
    reference_unit: int
    needs_reference: Callable[[Any], bool]
    section: str
    help: str
    preset: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    per_epoch_reference: bool = False

    @property
    def is_preset(self) -> bool:
        """Whether this command is a preset of another algorithm (``ipo``, ``rpo``)."""
        return self.name != self.base

    @property
    def shared_loop(self) -> bool:
        """Whether it trains in the shared loop (`align_core.trainer.train`)."""
        return self.step_factory is not None

    @property
    def synthetic_splits(self) -> tuple[str, str]:
        """Names of the synthetic task's training and held-out files it reads (no suffix)."""
        return f"{self.data_kind}_train", f"{self.data_kind}_eval"

    def build_step(self, config: Any, group: Any = None) -> AlgorithmStep:
        """The step of ``config`` (reductions over ``group``, the data-parallel group).

        Raises:
            ValueError: An algorithm with its own session (no step factory).
        """
        if self.step_factory is None:
            raise ValueError(f"algorithm {self.name!r} is not trained by the shared loop")
        return self.step_factory(config, group)


def _dpo_step(config: Any, _group: Any) -> AlgorithmStep:
    return DPOStep(config)


def _kto_step(config: Any, group: Any) -> AlgorithmStep:
    return KTOStep(config, group=group)


def _sft_step(config: Any, group: Any) -> AlgorithmStep:
    return SFTStep(config, group=group)


def _dpo_family(name: str, help: str, preset: Mapping[str, Any]) -> AlgorithmSpec:
    return AlgorithmSpec(
        name=name,
        base="dpo",
        config_class=DPOConfig,
        step_factory=_dpo_step,
        data_kind="preference",
        sequences_per_example=2,
        pack_factor=2,
        reference_unit=1,
        needs_reference=_always,
        section="dpo",
        help=help,
        preset=MappingProxyType(dict(preset)),
    )


_SPECS = (
    _dpo_family(
        "dpo", "Direct preference optimisation (model.dpo.*; cDPO via label_smoothing).", {}
    ),
    _dpo_family(
        "ipo", "IPO: DPO-family run with model.dpo.preference_loss=ipo.", {"preference_loss": "ipo"}
    ),
    # Reward-aware preference optimisation as in the Nemotron-4 340B report: the backward KL
    # between Bernoulli(sigma(eta * reward gap)) and Bernoulli(sigma(beta * margin)).
    _dpo_family(
        "rpo",
        "Reward-aware preference optimisation: model.dpo.preference_loss=rpo_bwd_kl "
        "(or rpo_sq, rpo_fwd_kl); rewards from chosen_reward/rejected_reward.",
        {"preference_loss": "rpo_bwd_kl"},
    ),
    AlgorithmSpec(
        name="kto",
        base="kto",
        config_class=KTOConfig,
        step_factory=_kto_step,
        data_kind="unpaired",
        sequences_per_example=2,
        pack_factor=None,
        reference_unit=2,
        needs_reference=_always,
        section="kto",
        help="KTO on unpaired desirable/undesirable examples (model.kto.*).",
        per_epoch_reference=True,
    ),
    AlgorithmSpec(
        name="sft",
        base="sft",
        config_class=SFTConfig,
        step_factory=_sft_step,
        data_kind="sft",
        sequences_per_example=1,
        pack_factor=1,
        reference_unit=0,
        needs_reference=_never,
        section="sft",
        help="Supervised fine-tuning on prompt/completion or chat data (model.sft.*).",
    ),
    AlgorithmSpec(
        name="spin",
        base="spin",
        config_class=SPINConfig,
        step_factory=None,
        data_kind="sft",
        sequences_per_example=2,
        pack_factor=None,
        reference_unit=1,
        needs_reference=_always,
        section="spin",
        help="Self-play fine-tuning on SFT data: iterations of generate, then train real vs "
        "generated (model.spin.*, trainer.spin.max_iterations).",
    ),
    AlgorithmSpec(
        name="kd",
        base="kd",
        config_class=None,
        step_factory=None,
        data_kind="sft",
        sequences_per_example=1,
        pack_factor=None,
        reference_unit=0,
        needs_reference=_never,
        section="knowledge_distillation",
        help="Distil a student from teacher top-k logits (model.knowledge_distillation.*; the "
        "teacher: .teacher.directory, .teacher.nemo_jsonl or .teacher.restore_from_path).",
    ),
)

REGISTRY: Mapping[str, AlgorithmSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""Every algorithm by command name, in ``align run --help`` order."""


def get_algorithm(name: str) -> AlgorithmSpec:
    """The `AlgorithmSpec` of ``name``.

    Raises:
        ValueError: An unknown name; the message lists the known ones.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; one of {', '.join(REGISTRY)}") from None
