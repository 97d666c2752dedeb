"""Dataclass fields as configuration values: the one conversion (with its checks) of a value from rag.toml (a TOML
value, or a string from `--set section.key=value`) and of a config.pbtxt string parameter into a field's type, and
back into a string (`render_parameters`). `Parameters` is the base of the models' typed parameters
(contract.params); `build_dataclass` builds rag.toml's settings sections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import UnionType
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints


class SettingsError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


#: Parameters Triton's python backend reads itself from config.pbtxt: not ours, passed over by `parse`.
TRITON_PARAMETERS = frozenset({"EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS"})
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
#: Field metadata of a token id: zero is a valid one (an int is positive otherwise).
TOKEN_ID: dict[str, Any] = {"minimum": 0}


def _at_least(minimum: float) -> str:
    return "positive" if minimum == 1 else "zero or more" if minimum == 0 else f"at least {minimum}"


def _convert(hint: Any, value: Any, where: str, minimum: float | None = None) -> Any:
    """`value` as the type `hint` names: a string (config.pbtxt, `--set`) or a TOML value; SettingsError, naming
    `where` (the section and key), when it is not one. Types: bool, int (positive unless `minimum` says otherwise),
    float (zero or more), str, Literal choices, tuples of ints ("1,2" or a TOML list) and `X | None` (None when
    absent; "" too for a number or a bool)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        (inner,) = [arg for arg in args if arg is not type(None)]
        if value is None or (value == "" and inner in (bool, int, float)):
            return None
        return _convert(inner, value, where, minimum)
    if origin is Literal:
        if value not in args:
            raise SettingsError(f"{where} must be one of {args}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            items: list[Any] = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise SettingsError(f"{where} must be a comma-separated list, got {value!r}")
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not variadic and len(items) != len(args):
            raise SettingsError(f"{where} must have {len(args)} values, got {len(items)} ({value!r})")
        return tuple(_convert(args[0], item, where, minimum) for item in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise SettingsError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            number = int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{where} must be an integer, got {value!r}") from None
        bound = 1 if minimum is None else minimum
        if number < bound:
            raise SettingsError(f"{where} must be {_at_least(bound)}, got {number}")
        return number
    if hint is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            real = float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{where} must be a number, got {value!r}") from None
        bound = 0 if minimum is None else minimum
        if not real >= bound:
            raise SettingsError(f"{where} must be {_at_least(bound)}, got {real}")
        return real
    if hint is str:
        return value if isinstance(value, str) else str(value)
    raise TypeError(f"{where}: no conversion to {hint!r}")


_HINTS: dict[type, dict[str, Any]] = {}
_NAMES: dict[type, frozenset[str]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _field_type(cls: type, field: dataclasses.Field) -> tuple[Any, bool]:
    """The field's type without `| None`, and whether it had it."""
    hint = _hints(cls)[field.name]
    if get_origin(hint) in (Union, UnionType):
        inner = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return hint, False


def _nested(cls: type, field: dataclasses.Field) -> type | None:
    """The dataclass a field holds, whose own fields are flattened beside the others' in config.pbtxt."""
    inner, _ = _field_type(cls, field)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


def parameter_names(cls: type) -> frozenset[str]:
    """The config.pbtxt parameter names of a parameters dataclass (a nested one's included)."""
    if cls not in _NAMES:
        names: set[str] = set()
        for field in dataclasses.fields(cls):
            nested = _nested(cls, field)
            own = parameter_names(nested) if nested is not None else {field.name}
            if names & own:
                raise TypeError(f"{cls.__name__}: parameter {sorted(names & own)} is defined twice")
            names |= own
        _NAMES[cls] = frozenset(names)
    return _NAMES[cls]


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def render_parameters(instance: Any) -> dict[str, str]:
    """A parameters dataclass as config.pbtxt string parameters: a None field is left out, a nested dataclass's
    fields are its own parameters."""
    rendered: dict[str, str] = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            rendered |= render_parameters(value)
        else:
            rendered[field.name] = _encode(value)
    return rendered


def _parse_fields(cls: type, parameters: Mapping[str, Any], section: str) -> Any:
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        nested = _nested(cls, field)
        if nested is not None:
            optional = _field_type(cls, field)[1]
            if optional and not parameter_names(nested) & parameters.keys():
                values[field.name] = None
            else:
                values[field.name] = _parse_fields(nested, parameters, section)
        elif field.name in parameters:
            hint = _hints(cls)[field.name]
            values[field.name] = _convert(hint, parameters[field.name], f"[{section}] {field.name}", _minimum(field))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SettingsError(f"[{section}] the parameter {field.name} is missing")
    return cls(**values)


def _minimum(field: dataclasses.Field) -> float | None:
    return field.metadata.get("minimum")


P = TypeVar("P", bound="Parameters")


class Parameters:
    """Base of the models' typed parameters (frozen keyword-only dataclasses): `render` for config.pbtxt at build
    time, `parse` in `initialize`; a value that is not of its field's type is refused on construction too."""

    #: Names the model in error messages.
    SECTION: ClassVar[str] = "parameters"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if value is not None and not dataclasses.is_dataclass(value):
                _convert(_hints(type(self))[field.name], value, f"[{self.SECTION}] {field.name}", _minimum(field))

    def render(self) -> dict[str, str]:
        return render_parameters(self)

    @classmethod
    def parse(cls: type[P], parameters: Mapping[str, str]) -> P:
        """From config.pbtxt's string parameters; SettingsError names the parameter that is missing, unknown or bad."""
        unknown = sorted(set(parameters) - parameter_names(cls) - TRITON_PARAMETERS)
        if unknown:
            raise SettingsError(f"[{cls.SECTION}] unknown parameters {unknown}; known: {sorted(parameter_names(cls))}")
        return _parse_fields(cls, parameters, cls.SECTION)


def build_dataclass(cls: type, section: str, values: dict[str, Any]) -> Any:
    """A settings dataclass from a rag.toml section (TOML values, or strings from `--set`), by the same conversions
    and checks as `Parameters.parse`."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingsError(f"[{section}] has unknown keys {unknown}; known keys: {sorted(known)}")
    hints = _hints(cls)
    converted = {key: _convert(hints[key], v, f"[{section}] {key}", _minimum(known[key])) for key, v in values.items()}
    return cls(**converted)
