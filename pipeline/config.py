"""Typed configuration: YAML mappings onto frozen dataclasses, with one clear error per mistake.

Every config in twostage is a frozen dataclass whose fields carry the defaults. `from_dict` maps a
plain mapping (parsed YAML) onto such a dataclass, recursing into nested dataclasses, and checks
types as it goes. Every error is a `ConfigError` whose message starts with the dotted path of the
offending key (``steps.data.source.kind: ...``), so the CLI can print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration mistake. The message names the key and says what is expected."""


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass `cls` from mapping `data`.

    Args:
        cls: A dataclass type.
        data: The mapping to read (None means "all defaults").
        where: Dotted path of `data` in the whole config, used in error messages.

    Returns:
        An instance of `cls`.

    Raises:
        ConfigError: unknown key, missing required key, wrong type, or a value the dataclass's
            ``__post_init__`` rejects.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_join(where, unknown[0])}: unknown key (allowed: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        # __post_init__ messages start with the field name ("image_size: ..."): join the paths
        text = str(e)
        field_name = text.split(":", 1)[0]
        if field_name in fields:
            raise ConfigError(_join(where, text)) from None
        raise ConfigError(f"{where}: {text}" if where else text) from None


def to_dict(config: Any) -> dict:
    """The plain-data form of a config dataclass."""
    return dataclasses.asdict(config)


def run_option(default: Any = None) -> Any:
    """A config field that says how to run, not what to compute (threads, actor counts).

    It is left out of artifact keys (`key_dict`), so changing it reuses what is stored.
    """
    return dataclasses.field(default=default, metadata={"in_key": False})


def key_dict(value: Any) -> Any:
    """`to_dict` without `run_option` fields: the config part of an artifact key."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: key_dict(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.metadata.get("in_key", True)
        }
    if isinstance(value, (list, tuple)):
        return [key_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: key_dict(v) for k, v in value.items()}
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _tagged_option(options: tuple, value: Any, where: str) -> type | None:
    """For a union of dataclasses told apart by a ``family`` field: the one `value` names."""
    classes = [o for o in options if dataclasses.is_dataclass(o)]
    if len(classes) < 2 or not isinstance(value, dict):
        return None
    by_family = {}
    for cls in classes:
        field = {f.name: f for f in dataclasses.fields(cls)}.get("family")
        if field is None:
            return None
        for name in typing.get_args(typing.get_type_hints(cls)["family"]):
            by_family.setdefault(name, cls)
    if "family" not in value:
        return classes[0]  # the first option is the default family
    if value["family"] not in by_family:
        choices = ", ".join(repr(f) for f in by_family)
        raise ConfigError(
            f"{_join(where, 'family')}: must be one of {choices}, got {value['family']!r}"
        )
    return by_family[value["family"]]


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tagged = _tagged_option(args, value, where)
        if tagged is not None:
            return from_dict(tagged, value, where)
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        expected = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{where}: expected {expected}, got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, where): _convert(val_tp, v, _join(where, str(k)))
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"config type {tp!r} at {where} is not supported")
