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

Importing this module imports neither torch nor the algorithms: configuration classes are named
by import path and step factories import their step when called, so ``align --help`` reads the
registry without paying for torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from align_core.algorithms.contract import AlgorithmStep

__all__ = ["REGISTRY", "AlgorithmSpec", "DataKind", "get_algorithm"]

DataKind = Literal["preference", "unpaired", "sft"]
"""align-data's record kinds (`align_data.PreprocessConfig.kind`)."""

StepFactory = Callable[[Any, Any], "AlgorithmStep"]
"""``(config, data_parallel_group) -> step``."""


def _always(_config: Any) -> bool:
    return True


def _never(_config: Any) -> bool:
    return False


def _from_config(config: Any) -> bool:
    return bool(config.needs_reference)


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the toolkit knows about one algorithm (one ``align run`` command).

    Attributes:
        name: The command (``dpo``, ``ipo``, ``rpo``, ``kto``, ``sft``, ``spin``, ``kd``).
        base: The algorithm it runs as (`align_core.trainer.RunConfig.algorithm`, and the
            configuration tree): ``dpo`` for ``ipo`` and ``rpo``, else ``name``.
        config: ``"module:Class"`` of its settings dataclass (``model.<section>``, imported by
            `config_class`); None where it lives in a package align-core does not import
            (``kd``).
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
        preset: Values of ``config_class`` fields this command sets (its preset); empty for a
            base algorithm. The first field names the variant (`variant_key`); the others are
            defaults the user may change.
        preset_accepts: The values of the variant field the command accepts when the user
            sets it (empty: only the preset's value).
        help: The one-line help of ``align run <name>``.
        min_micro_batch_size: The smallest ``model.micro_batch_size`` its loss works with.
        min_micro_batch_reason: Why (the error message's explanation).
    """

    name: str
    base: str
    config: str | None
    step_factory: StepFactory | None
    data_kind: DataKind
    sequences_per_example: int
    pack_factor: int | None
    reference_unit: int
    needs_reference: Callable[[Any], bool]
    section: str
    help: str
    preset: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    preset_accepts: tuple[Any, ...] = ()
    per_epoch_reference: bool = False
    min_micro_batch_size: int = 1
    min_micro_batch_reason: str = ""

    @property
    def config_class(self) -> type | None:
        """Its settings dataclass (imported on first use), or None (``kd``)."""
        if self.config is None:
            return None
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def is_preset(self) -> bool:
        """Whether this command is a preset of another algorithm (``ipo``, ``rpo``)."""
        return self.name != self.base

    @property
    def variant_key(self) -> str | None:
        """The field that makes this command what it is (the preset's first), or None."""
        return next(iter(self.preset), None)

    @property
    def shared_loop(self) -> bool:
        """Whether it trains in the shared loop (`align_core.trainer.train`)."""
        return self.step_factory is not None

    @property
    def synthetic_splits(self) -> tuple[str, str]:
        """Names of the synthetic task's training and held-out files it reads (no suffix)."""
        return f"{self.data_kind}_train", f"{self.data_kind}_eval"

    def check_micro_batch_size(self, micro_batch_size: int) -> None:
        """Refuse a micro-batch smaller than the loss works with.

        Raises:
            ValueError: ``micro_batch_size`` below `min_micro_batch_size`, saying why.
        """
        if micro_batch_size < self.min_micro_batch_size:
            raise ValueError(
                f"{self.min_micro_batch_reason}, so model.micro_batch_size must be >= "
                f"{self.min_micro_batch_size} (got {micro_batch_size})"
            )

    def build_step(self, config: Any, group: Any = None) -> AlgorithmStep:
        """The step of ``config`` (reductions over ``group``, the data-parallel group).

        Raises:
            ValueError: An algorithm with its own session (no step factory).
        """
        if self.step_factory is None:
            raise ValueError(f"algorithm {self.name!r} is not trained by the shared loop")
        return self.step_factory(config, group)


def _dpo_step(config: Any, group: Any) -> AlgorithmStep:
    from align_core.algorithms.dpo import DPOStep

    return DPOStep(config, group)


def _kto_step(config: Any, group: Any) -> AlgorithmStep:
    from align_core.algorithms.kto import KTOStep

    return KTOStep(config, group=group)


def _sft_step(config: Any, group: Any) -> AlgorithmStep:
    from align_core.algorithms.sft import SFTStep

    return SFTStep(config, group=group)


def _dpo_family(
    name: str, help: str, preset: Mapping[str, Any], accepts: tuple[Any, ...] = ()
) -> AlgorithmSpec:
    return AlgorithmSpec(
        name=name,
        base="dpo",
        config="align_core.algorithms.dpo:DPOConfig",
        step_factory=_dpo_step,
        data_kind="preference",
        sequences_per_example=2,
        pack_factor=2,
        reference_unit=1,
        needs_reference=_from_config,
        section="dpo",
        help=help,
        preset=MappingProxyType(dict(preset)),
        preset_accepts=accepts,
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
        ("rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"),
    ),
    # Reference-free objectives: the DPO step with no reference pass and no reference memory.
    _dpo_family(
        "simpo",
        "SimPO: reference-free, length-normalised margin (model.dpo.preference_loss=simpo; "
        "β=model.dpo.ref_policy_kl_penalty, target margin model.dpo.gamma).",
        {"preference_loss": "simpo", "ref_policy_kl_penalty": 2.0},
    ),
    _dpo_family(
        "cpo",
        "CPO: reference-free preference loss plus NLL (model.dpo.preference_loss=cpo; "
        "model.dpo.nll_weight).",
        {"preference_loss": "cpo", "ref_policy_kl_penalty": 0.1},
    ),
    _dpo_family(
        "orpo",
        "ORPO: NLL plus odds-ratio preference term, no reference (model.dpo.preference_loss=orpo; "
        "model.dpo.odds_ratio_weight).",
        {"preference_loss": "orpo"},
    ),
    AlgorithmSpec(
        name="kto",
        base="kto",
        config="align_core.algorithms.kto:KTOConfig",
        step_factory=_kto_step,
        data_kind="unpaired",
        sequences_per_example=2,
        pack_factor=None,
        reference_unit=2,
        needs_reference=_always,
        section="kto",
        help="KTO on unpaired desirable/undesirable examples (model.kto.*).",
        per_epoch_reference=True,
        min_micro_batch_size=2,
        min_micro_batch_reason="KTO pairs prompt_i with completion_(i+1 mod B) inside each "
        "micro-batch for its KL estimate",
    ),
    AlgorithmSpec(
        name="sft",
        base="sft",
        config="align_core.algorithms.sft:SFTConfig",
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
        config="align_core.algorithms.spin:SPINConfig",
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
        config=None,
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
