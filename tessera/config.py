"""Typed configuration: dataclass trees built from plain dicts (YAML), with errors that say what to fix.

Every component of Tessera describes its settings as a dataclass. This module turns nested dicts into
those dataclasses, checking types and rejecting unknown keys with the closest valid key, and turns
them back into plain dicts for writing `config.yaml`. It sits at the bottom of the import graph, in the package
root, and imports nothing of Tessera's: `models`, `data`, `train` and `eval` all build on it.

A field's help text is `field(metadata={"help": "..."})`; `describe()` renders it for `--help`.
A dataclass can take over its own parsing with a `from_dict(cls, data, where)` classmethod and its own
serialisation with `to_dict(self)` (used by tower configs, whose fields depend on the encoder).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "closest",
    "describe",
    "key_docs",
    "KeyDoc",
    "set_dotted",
    "field_names",
    "require",
    "UserError",
    "MissingExtra",
    "from_fields",
]


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class UserError(Exception):
    """An error whose message tells the user what to change (a config, a file, the data, a run's settings): a
    command prints it as `error: ...`, with no traceback, and exits with `exit_code`."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message names the key and what to do."""


class MissingExtra(UserError, ImportError):
    """A module needs an optional extra that is not installed; the message says how to install it."""


def closest(key: str, options: typing.Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest option, or '' when nothing is close."""
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert dicts to dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}.{closest(str(value), map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, _join(where, i)) for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, _join(where, i)) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _convert(val_tp, v, _join(where, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads `5e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, validating every key and value.

    Unknown keys raise `ConfigError` naming the closest valid key. Errors raised by the dataclass's
    own `__post_init__` checks are re-raised with the key path prefixed.
    """
    custom = cls.__dict__.get("from_dict")
    if custom is not None:
        return cls.from_dict(data, where)
    return from_fields(cls, data, where)


def from_fields(cls: type, data: Any, where: str = "") -> Any:
    """The generic part of `from_dict`, for classes whose own `from_dict` hook pre-processes `data`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"unknown key '{_join(where, key)}'.{closest(str(key), names)} Valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _convert(hints[key], value, _join(where, key))
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        prefix = f"{where}: " if where and not str(exc).startswith(where) else ""
        raise ConfigError(f"{prefix}{exc}") from None


def to_dict(obj: Any) -> Any:
    """Inverse of `from_dict`: plain dicts, lists and scalars, ready for YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        custom = getattr(obj, "to_dict", None)
        if custom is not None:
            return custom()
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c=value` inside nested dicts, creating intermediate mappings."""
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if isinstance(nxt, list) and parts[i + 1].isdigit():
            raise ConfigError(f"'{dotted}': set the whole list instead, e.g. {'.'.join(parts[: i + 1])}=[...]")
        if not isinstance(nxt, dict):
            raise ConfigError(f"'{dotted}': '{'.'.join(parts[: i + 1])}' is {nxt!r}, not a mapping")
        node = nxt
    node[parts[-1]] = value


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One leaf key of a config tree, as `--help` and the generated reference show it."""

    key: str  # dotted: train.ema.decay
    type: str
    default: Any  # "required" where there is none
    help: str


def key_docs(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of dataclass `cls` (nested sections flattened into dotted keys; a section that is off by default,
    `X | None`, followed by its keys as they are once it is set)."""
    docs = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):  # a section: its keys
            docs.extend(key_docs(tp, key))
            continue
        if "shown" in f.metadata:  # a default that is costly to build, as the recipe would write it
            default = f.metadata["shown"]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = to_dict(f.default_factory())
        else:
            default = "required"
        section = _optional_section(tp)
        type_name = f"{section.__name__} | None" if section is not None else _type_name(tp)
        docs.append(KeyDoc(key, type_name, default, f.metadata.get("help", "")))
        if section is not None:
            docs.extend(key_docs(section, key))
    return docs


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf key: `dotted.key (type, default) help`, for `--help`."""
    return [f"  {d.key} = {d.default!r}\n      {d.type}. {d.help}".rstrip() for d in key_docs(cls, prefix)]


def _optional_section(tp: Any) -> type | None:
    """The dataclass of an `X | None` annotation whose X is a dataclass parsed field by field; else None."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition; for use in __post_init__."""
    if not condition:
        raise ConfigError(message)
