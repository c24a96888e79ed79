"""Command-line overrides -> a composed, checked, typed configuration tree.

Overrides are Hydra's: ``key=value``, plus NeMo users' ``+key=value`` and ``++key=value`` (the
tree is closed, so all three set an existing key). Every key is checked against the tree before
Hydra sees it: a misspelt key fails naming the bad key and the closest valid one. Values are
parsed by Hydra's override grammar (lists ``[a,b]``, mappings ``{train: [a.jsonl]}``, ``null``)
and type-checked by OmegaConf; a value of the wrong type fails naming the key and the type.
Composition uses Hydra's public compose API on a structured config registered in its
``ConfigStore``; the result is converted with ``OmegaConf.to_object`` and then to the typed
dataclasses (`align_cli.config.structured.build`), so nothing downstream sees OmegaConf.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_origin

from omegaconf import DictConfig, OmegaConf

from align_cli.config.schema import ALGORITHM_SECTIONS, TreeAlgorithm, tree_class
from align_cli.config.structured import build, mirror
from align_cli.errors import ConfigError

__all__ = [
    "NEMO_KEYS_WITHOUT_EFFECT",
    "Composed",
    "Override",
    "all_keys",
    "check_key",
    "compose",
    "load_tree",
    "parse_overrides",
    "to_yaml",
]

NEMO_KEYS_WITHOUT_EFFECT: dict[str, str] = {
    "trainer.accelerator": "the device is chosen automatically (CUDA when present, else CPU)",
    "trainer.logger": "align writes metrics.jsonl and TensorBoard events itself",
    "trainer.enable_checkpointing": "checkpoints are configured by trainer.<algo>.save_interval",
    "trainer.use_distributed_sampler": "align's sampler is always data-parallel aware",
    "model.mcore_gpt": "align always uses megatron-core models",
    "model.megatron_amp_O2": "parameters are kept in model.dtype with fp32 optimizer state",
    "model.dist_ckpt_load_strictness": "checkpoint loading is always strict",
    "model.data.data_impl": "JSONL and Parquet are detected; packing is model.data.packing",
    "model.data.num_workers": "tokenized data is memory-mapped; there are no loader workers",
    "model.optim.name": "align uses megatron's Adam(W) (its distributed optimizer where it helps)",
    "model.optim.bucket_cap_mb": "gradient buckets are sized by megatron's defaults",
    "model.optim.overlap_grad_sync": "gradient reduction overlap is megatron's default",
    "model.optim.contiguous_grad_buffer": "megatron DDP always uses a contiguous buffer",
    "model.optim.sched.constant_steps": "use model.optim.sched.decay_steps",
    "model.peft.lora_tuning.column_init_method": "LoRA's A is random and B starts at zero",
    "model.peft.lora_tuning.row_init_method": "LoRA's A is random and B starts at zero",
    "model.peft.lora_tuning.variant": "align's LoRA is the plain (nemo) variant",
    "exp_manager.create_wandb_logger": "Weights & Biases is not built in",
    "exp_manager.wandb_logger_kwargs": "Weights & Biases is not built in",
    "exp_manager.resume_ignore_no_checkpoint": "a run with no checkpoint starts from step 0",
    "exp_manager.create_checkpoint_callback": "checkpoints are always written",
}
"""NeMo-Aligner keys accepted (so NeMo command lines carry over) that change nothing in align."""


@dataclass(frozen=True)
class Override:
    """One ``key=value`` argument.

    Attributes:
        raw: The argument as typed.
        key: Dotted key without ``+``/``++``.
        value: The value text (Hydra grammar).
    """

    raw: str
    key: str
    value: str


@dataclass(frozen=True)
class Composed:
    """A composed configuration.

    Attributes:
        algorithm: The tree's algorithm.
        config: The composed tree (OmegaConf, for writing ``config.yaml``).
        tree: The same tree as typed dataclasses.
        notes: Messages for the user (NeMo keys without effect).
    """

    algorithm: TreeAlgorithm
    config: DictConfig
    tree: Any
    notes: tuple[str, ...]


def parse_overrides(args: Sequence[str]) -> list[Override]:
    """Split ``key=value`` arguments (with optional ``+``/``++`` prefixes).

    Raises:
        ConfigError: An argument without ``=``, or a deletion (``~key``).
    """
    out = []
    for raw in args:
        text = raw.strip()
        if text.startswith("~"):
            raise ConfigError(f"{raw}: deleting keys is not supported; set a value instead")
        if "=" not in text:
            hint = " (options start with --)" if text.startswith("-") else ""
            raise ConfigError(f"{raw}: expected key=value{hint}")
        key, value = text.split("=", 1)
        key = key.lstrip("+").strip()
        if not key:
            raise ConfigError(f"{raw}: missing key before '='")
        out.append(Override(raw=raw, key=key, value=value))
    return out


def _open_ended(tp: Any) -> bool:
    """Whether a field of this type accepts arbitrary sub-keys (``Any`` or a mapping)."""
    return tp is Any or get_origin(tp) is dict


def _children(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a typed tree class (sections and leaves)."""
    keys = []
    for name, tp in _children(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += all_keys(tp, key + ".")
    return keys


SYNONYMS = {
    "learning_rate": "lr",
    "beta": "ref_policy_kl_penalty",
    "kl_penalty": "ref_policy_kl_penalty",
    "loss_type": "preference_loss",
    "batch_size": "global_batch_size",
    "epochs": "max_epochs",
    "num_epochs": "max_epochs",
    "steps": "max_steps",
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "seq_len": "seq_length",
    "max_length": "seq_length",
    "lora_rank": "adapter_dim",
    "rank": "adapter_dim",
    "data_prefix": "file_path",
    "file_path": "data_prefix",
    "greedy": "use_greedy",
    "tokens_to_generate": "max_length",
    "kl_loss": "kd_loss",
    "output_path": "output",
    "output_dir": "output",
}
"""Names users bring from other trainers (TRL, Megatron-LM) -> the key name used here."""


def _suggest(key: str, cls: type) -> str:
    keys = all_keys(cls) + list(NEMO_KEYS_WITHOUT_EFFECT)
    parent, _, last = key.rpartition(".")
    if last in SYNONYMS:
        wanted = SYNONYMS[last]
        same = f"{parent}.{wanted}" if parent else wanted
        ends = [k for k in keys if k == same] or [k for k in keys if k.endswith("." + wanted)]
        if ends:
            return f"; did you mean {ends[0]}?"
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:
        # Compare the last component against every key that ends in a close name.
        last = key.rsplit(".", 1)[-1]
        names = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = difflib.get_close_matches(last, list(names), n=1, cutoff=0.75)
        match = [names[near[0]]] if near else []
    return f"; did you mean {match[0]}?" if match else ""


def check_key(cls: type, key: str) -> tuple[bool, bool]:
    """Check that ``key`` exists in the tree class ``cls``.

    Returns:
        ``(open_ended, without_effect)``: whether the key lies inside a field that takes any
        sub-keys (``model.data.data_prefix.train``), and whether it is a NeMo key without
        effect in align.

    Raises:
        ConfigError: The key does not exist; the message names it and the closest valid key.
    """
    for nemo_key in NEMO_KEYS_WITHOUT_EFFECT:
        if key == nemo_key or key.startswith(nemo_key + "."):
            return False, True
    node: Any = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        children = _children(node)
        if part not in children:
            where = ".".join(parts[:i]) or "the configuration"
            owner = _SECTION_COMMANDS.get(part)
            if i == 1 and owner and parts[0] in ("model", "trainer") and _algorithm_of(cls):
                raise ConfigError(
                    f"{key}: {parts[0]}.{part} belongs to `align run {owner}`"
                    f" (this run uses {parts[0]}.{_algorithm_of(cls)})",
                    key=key,
                )
            raise ConfigError(
                f"{key}: no such key ({part!r} is not in {where}){_suggest(key, cls)}", key=key
            )
        tp = children[part]
        if i == len(parts) - 1:
            return False, False
        if _open_ended(tp):
            return True, False
        if not dataclasses.is_dataclass(tp):
            leaf = ".".join(parts[: i + 1])
            raise ConfigError(f"{key}: {leaf} is a value, not a section", key=key)
        node = tp
    return False, False


_SECTION_COMMANDS = {section: command for command, section in ALGORITHM_SECTIONS.items()}


def _algorithm_of(cls: type) -> str | None:
    """The ``trainer.<section>`` of a training tree (None for the other trees)."""
    trainer = _children(cls)["trainer"]
    return next((name for name in _children(trainer) if name in _SECTION_COMMANDS), None)


_TYPE_WORDS = {
    "Integer": "an integer",
    "Float": "a number",
    "Boolean": "true or false",
    "String": "a string",
}


def _explain(exc: Exception, overrides: Sequence[Override]) -> ConfigError:
    """Turn a Hydra/OmegaConf composition error into one line naming the key."""
    cause = exc.__cause__ or exc
    text = str(cause)
    first = text.splitlines()[0] if text else type(cause).__name__
    key = getattr(cause, "full_key", None) or ""
    for word, phrase in _TYPE_WORDS.items():
        if f"could not be converted to {word}" in first:
            first = f"expected {phrase}, got {first.split(chr(39))[1]!r}"
    if "is not a valid bool" in first:
        first = f"expected true or false, got {first.split(chr(39))[1]!r}"
    if not key:
        for override in overrides:
            if override.raw in str(exc) or f"{override.key}=" in str(exc):
                key = override.key
                break
    if "Cannot convert" in first and key:
        first = f"expected a single value, got {first.split(': ', 1)[-1]}"
    if type(exc).__name__ == "OverrideParseException":
        return ConfigError(f"cannot parse override: {first} (Hydra override grammar)")
    return ConfigError(f"{key}: {first}" if key else first, key=key)


def _store(name: str, node: Any) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=node)


def load_tree(algorithm: TreeAlgorithm, path: str | Path) -> DictConfig:
    """Read a YAML file of (part of) the tree, checking every key.

    Raises:
        ConfigError: A key that does not exist (with the closest valid key).
    """
    data = OmegaConf.load(path)
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    cls = tree_class(algorithm)
    for key in _leaf_keys(OmegaConf.to_container(data)):
        try:
            check_key(cls, key)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}", key=exc.key) from exc
    return data


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict) or not data:
        return [prefix[:-1]] if prefix else []
    keys = []
    for name, value in data.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _drop_without_effect(data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        return data
    out = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key in NEMO_KEYS_WITHOUT_EFFECT:
            continue
        out[name] = _drop_without_effect(value, key + ".")
    return out


def compose(
    algorithm: TreeAlgorithm,
    overrides: Sequence[str] = (),
    *,
    base: Sequence[DictConfig] = (),
) -> Composed:
    """Compose the tree of ``algorithm`` from its defaults, ``base`` layers and ``overrides``.

    Args:
        algorithm: ``dpo``, ``kto`` or ``sft``.
        overrides: ``key=value`` arguments (``+``/``++`` prefixes accepted).
        base: Partial trees merged over the defaults in order, before the overrides (a
            ``--config`` file, a preset, the saved config of a resumed run).

    Raises:
        ConfigError: An unknown key (with a suggestion), a value of the wrong type or out of
            its choices, or a value the typed configs reject; always naming the key.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize
    from hydra.errors import HydraException

    cls = tree_class(algorithm)
    parsed = parse_overrides(overrides)
    notes = []
    hydra_overrides = []
    for override in parsed:
        open_ended, without_effect = check_key(cls, override.key)
        if without_effect:
            notes.append(
                f"{override.key}: NeMo-Aligner key without effect in align "
                f"({_reason(override.key)}); ignored"
            )
            continue
        prefix = "++" if open_ended else ""
        hydra_overrides.append(f"{prefix}{override.key}={override.value}")
    node = OmegaConf.structured(mirror(cls))
    for layer in base:
        plain = _drop_without_effect(OmegaConf.to_container(layer))
        try:
            node = OmegaConf.merge(node, plain)
        except Exception as exc:  # OmegaConf validation errors
            raise _explain(exc, parsed) from exc
    name = f"align_{algorithm}_{id(node)}"
    _store(name, node)
    try:
        with initialize(version_base=None):
            config = hydra_compose(config_name=name, overrides=hydra_overrides)
    except HydraException as exc:
        raise _explain(exc, parsed) from exc
    OmegaConf.set_struct(config, False)
    plain = OmegaConf.to_object(config)
    tree = build(cls, plain)
    return Composed(algorithm=algorithm, config=config, tree=tree, notes=tuple(notes))


def _reason(key: str) -> str:
    for nemo_key, reason in NEMO_KEYS_WITHOUT_EFFECT.items():
        if key == nemo_key or key.startswith(nemo_key + "."):
            return reason
    return ""


def to_yaml(config: DictConfig) -> str:
    """The composed tree as YAML (what ``config.yaml`` of a run holds)."""
    return OmegaConf.to_yaml(config, resolve=True)
