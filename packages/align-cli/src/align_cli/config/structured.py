"""OmegaConf-compatible mirrors of typed dataclasses, and the way back.

The configuration dataclasses of align-core and align-data use ``Literal`` fields, frozen
classes and unions, which OmegaConf 2.3 cannot hold as structured configs. `mirror` derives from
such a dataclass a plain dataclass with the same field names and *the same defaults* (read from
the source class, so every default keeps its one home) and types OmegaConf understands:
``Literal[...]`` becomes ``str``, other non-optional unions become ``Any``, tuples become lists.
`build` turns what ``OmegaConf.to_object`` returns back into the typed dataclass, checking
``Literal`` choices and prefixing every error with the dotted key.

`typed_section` makes the CLI's own section dataclasses where fields are gathered from several
places (for example NeMo's flat ``model.*`` keys that belong to `align_core.ParallelConfig`);
`flat_fields` lists a source dataclass's fields with their defaults for that purpose.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any, ClassVar, Literal, Protocol, TypeVar, Union, get_args, get_origin

from align_cli.errors import ConfigError

__all__ = [
    "FieldSpec",
    "build",
    "choices_of",
    "extract",
    "field_docs",
    "flat_fields",
    "mirror",
    "typed_section",
]


class _Dataclass(Protocol):
    """An instance of a dataclass (what `dataclasses.fields` accepts)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


T = TypeVar("T", bound=_Dataclass)

INT_OR_FLOAT: set[tuple[str, str]] = {
    ("TrainerConfig", "val_check_interval"),
    ("TrainerConfig", "limit_train_batches"),
    ("TrainerConfig", "limit_val_batches"),
}
"""``(class name, field)`` of fields annotated ``float`` whose meaning depends on whether the
value is an int (a count of steps or batches) or a float (a fraction), as in NeMo/Lightning.
Their mirrors keep what the user typed (``1`` stays an int, ``1.0`` a float)."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One field of a section: name, type, default and a line of help.

    Attributes:
        name: Key name in the configuration tree.
        type: The field's (typed-world) type; dataclasses nest.
        default: Default value (ignored when ``factory`` is given).
        factory: Default factory.
        doc: One line of help.
    """

    name: str
    type: Any
    default: Any = None
    factory: Callable[[], Any] | None = None
    doc: str = ""


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) in (Union, types.UnionType):
        return get_args(tp)
    return None


def choices_of(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` (or ``Literal | None``) type, else None."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    for arg in _union_args(tp) or ():
        if get_origin(arg) is Literal:
            return get_args(arg)
    return None


def _is_number_union(tp: Any) -> bool:
    args = _union_args(tp)
    return args is not None and {a for a in args if a is not type(None)} == {int, float}


def _omega_type(tp: Any) -> Any:
    """A type OmegaConf 2.3 accepts for values of ``tp``."""
    if _is_number_union(tp):
        return Any
    if dataclasses.is_dataclass(tp):
        return mirror(tp)
    if get_origin(tp) is Literal:
        return str if all(isinstance(v, str) for v in get_args(tp)) else Any
    args = _union_args(tp)
    if args is not None:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner = _omega_type(rest[0])
            return Any if inner is Any else typing.Optional[inner]  # noqa: UP045
        return Any
    origin = get_origin(tp)
    inner = get_args(tp)
    if origin is dict:
        return dict[str, Any]
    if origin is tuple and inner and (inner[-1] is Ellipsis or len(set(inner)) == 1):
        return list[_omega_type(inner[0])]
    if origin is list and inner:
        return list[_omega_type(inner[0])]
    if tp in (int, float, bool, str):
        return tp
    return Any


def _to_mirror(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = {f.name: _to_mirror(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return mirror(type(obj))(**values)
    if isinstance(obj, tuple):
        return [_to_mirror(v) for v in obj]
    if isinstance(obj, list):
        return [_to_mirror(v) for v in obj]
    return obj


def _default_kwargs(default: Any, factory: Callable[[], Any] | None) -> dict[str, Any]:
    if factory is not None:
        return {"default_factory": factory}
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict, tuple)):
        return {"default_factory": lambda v=default: v}
    return {"default": default}


@cache
def mirror(cls: type) -> type:
    """The OmegaConf-compatible mirror of dataclass ``cls`` (cached per class)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            kwargs = {"default_factory": lambda f=f.default_factory: _to_mirror(f())}
        elif f.default is not dataclasses.MISSING:
            value = f.default
            if dataclasses.is_dataclass(value) or isinstance(value, (list, dict, tuple)):
                kwargs = {"default_factory": lambda v=value: _to_mirror(v)}
            else:
                kwargs = {"default": value}
        else:
            kwargs = {}
        tp = Any if (cls.__name__, f.name) in INT_OR_FLOAT else _omega_type(hints[f.name])
        fields.append((f.name, tp, dataclasses.field(**kwargs)))
    out = dataclasses.make_dataclass(f"{cls.__name__}Tree", fields)
    out.__doc__ = f"OmegaConf mirror of `{cls.__module__}.{cls.__qualname__}`."
    return out


def flat_fields(
    cls: type,
    *,
    optional: bool = False,
    rename: dict[str, str] | None = None,
    exclude: tuple[str, ...] = (),
) -> list[FieldSpec]:
    """The fields of dataclass ``cls`` as `FieldSpec` with ``cls``'s own defaults.

    Args:
        cls: Source dataclass.
        optional: Make every field ``X | None`` with default None ("not set here: keep the
            value from elsewhere, else ``cls``'s default").
        rename: Source field name to key name.
        exclude: Source fields to leave out.
    """
    hints = typing.get_type_hints(cls)
    rename = rename or {}
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        name = rename.get(f.name, f.name)
        if optional:
            specs.append(FieldSpec(name, hints[f.name] | None, None))
        else:
            factory = None if f.default_factory is dataclasses.MISSING else f.default_factory
            specs.append(FieldSpec(name, hints[f.name], f.default, factory))
    return specs


def typed_section(name: str, doc: str, specs: list[FieldSpec]) -> type:
    """Make a typed section dataclass from field specs.

    Args:
        name: Class name.
        doc: Class docstring (shown by ``align run ... --show-config``).
        specs: The fields, in order.
    """
    fields = [
        (
            s.name,
            s.type,
            dataclasses.field(**_default_kwargs(s.default, s.factory), metadata={"doc": s.doc}),
        )
        for s in specs
    ]
    cls = dataclasses.make_dataclass(name, fields)
    cls.__doc__ = doc
    cls.__module__ = "align_cli.config.schema"
    return cls


def field_docs(cls: type) -> dict[str, str]:
    """Key name to its help line, for a section made by `typed_section`."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def _closest(value: Any, options: tuple[Any, ...]) -> str:
    match = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _number(value: Any, key: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}", key=key)
    return value


def _convert(tp: Any, value: Any, key: str, *, int_or_float: bool = False) -> Any:
    if value is None:
        return None
    if int_or_float or _is_number_union(tp):
        return _number(value, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    choices = choices_of(tp)
    if choices is not None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(
                f"{key}: {value!r} is not one of {allowed}{_closest(value, choices)}", key=key
            )
        return value
    args = _union_args(tp)
    if args is not None:
        rest = [a for a in args if a is not type(None)]
        return _convert(rest[0], value, key) if len(rest) == 1 else value
    origin = get_origin(tp)
    inner = get_args(tp)
    if origin is tuple and isinstance(value, (list, tuple)):
        if inner and inner[-1] is Ellipsis:
            return tuple(_convert(inner[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(inner) != len(value):
            raise ConfigError(f"{key}: expected {len(inner)} values, got {len(value)}", key=key)
        pairs = enumerate(zip(inner, value, strict=True))
        return tuple(_convert(t, v, f"{key}[{i}]") for i, (t, v) in pairs)
    if origin is list and isinstance(value, (list, tuple)) and inner:
        return [_convert(inner[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _construct(cls: type[T], kwargs: dict[str, Any], key: str) -> T:
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        if not key or text.startswith(key) or text.startswith("model."):
            raise ConfigError(text, key=key) from exc
        raise ConfigError(f"{key}: {text}", key=key) from exc


def build(cls: type[T], value: Any, key: str = "") -> T:
    """Construct typed dataclass ``cls`` from its mirror instance ``value``.

    Args:
        cls: The typed dataclass.
        value: An instance of ``mirror(cls)``, as ``OmegaConf.to_object`` returns it.
        key: Dotted key of ``value`` in the tree, for error messages.

    Raises:
        ConfigError: A ``Literal`` value out of range, or the dataclass's own validation failed;
            the message names the dotted key.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        child = f"{key}.{f.name}" if key else f.name
        special = (cls.__name__, f.name) in INT_OR_FLOAT
        kwargs[f.name] = _convert(
            hints[f.name], getattr(value, f.name), child, int_or_float=special
        )
    return _construct(cls, kwargs, key)


def extract(cls: type[T], section: Any, key: str, *, rename: dict[str, str] | None = None) -> T:
    """Build source dataclass ``cls`` from the flattened fields of a typed section.

    Fields of ``section`` that are None are left to ``cls``'s defaults (see `flat_fields`
    with ``optional=True``).

    Args:
        cls: The source dataclass whose fields were flattened into ``section``.
        section: The typed section instance.
        key: Dotted key of the section, for error messages.
        rename: The same renaming that was given to `flat_fields`.
    """
    rename = rename or {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = rename.get(f.name, f.name)
        if hasattr(section, name):
            value = getattr(section, name)
            if value is not None:
                kwargs[f.name] = value
    return _construct(cls, kwargs, key)
