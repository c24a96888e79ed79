"""State-dict key names of megatron's Transformer Engine spec ↔ its local (CPU) spec.

Transformer Engine fuses each pre-norm into the linear layer that follows it:

* ``layers.N.input_layernorm.{weight,bias}`` (local) ↔
  ``layers.N.self_attention.linear_qkv.layer_norm_{weight,bias}`` (TE)
* ``layers.N.pre_mlp_layernorm.{weight,bias}`` (local) ↔
  ``layers.N.mlp.linear_fc1.layer_norm_{weight,bias}`` (TE)

Every other parameter has the same name in both. ``_extra_state`` entries (TE's fp8 metadata;
``None`` placeholders in the local spec) do not carry over between specs and are dropped by the
conversions. Keys may carry any prefix (``model.``, ``module.``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal, TypeVar

__all__ = ["Spec", "convert_spec", "detect_spec", "local_to_te", "te_to_local"]

Spec = Literal["te", "local"]
V = TypeVar("V")

_LOCAL_TO_TE = (
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
)
_LAYER_PREFIX = re.compile(r"^(.*?(?:^|\.)layers\.\d+\.)(.*)$")


def _rename(key: str, pairs: Iterable[tuple[str, str]]) -> str:
    match = _LAYER_PREFIX.match(key)
    if match is None:
        return key
    head, rest = match.groups()
    for old, new in pairs:
        if rest.startswith(old) and rest.count(".") == old.count("."):
            return head + new + rest[len(old) :]
    return key


def local_to_te(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename local-spec keys to Transformer Engine names; drop ``_extra_state`` entries."""
    return {
        _rename(k, _LOCAL_TO_TE): v for k, v in state_dict.items() if not k.endswith("_extra_state")
    }


def te_to_local(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename Transformer Engine keys to local-spec names; drop ``_extra_state`` entries."""
    reverse = [(new, old) for old, new in _LOCAL_TO_TE]
    return {_rename(k, reverse): v for k, v in state_dict.items() if not k.endswith("_extra_state")}


def detect_spec(keys: Iterable[str]) -> Spec | None:
    """Which spec's key names a state dict uses.

    Returns:
        ``"te"`` when any key holds a fused ``layer_norm_weight``, ``"local"`` when any key holds
        a separate ``input_layernorm``/``pre_mlp_layernorm``, None when neither (no layers).
    """
    local = False
    for key in keys:
        if ".linear_qkv.layer_norm_" in key or ".linear_fc1.layer_norm_" in key:
            return "te"
        if ".input_layernorm." in key or ".pre_mlp_layernorm." in key:
            local = True
    return "local" if local else None


def convert_spec(state_dict: Mapping[str, V], to: Spec) -> dict[str, V]:
    """Convert a state dict to the key names of spec ``to`` (whatever spec it is in now).

    ``_extra_state`` entries are kept only when the dict is already in spec ``to``.
    """
    current = detect_spec(state_dict)
    if current is None or current == to:
        return dict(state_dict)
    return local_to_te(state_dict) if to == "te" else te_to_local(state_dict)
