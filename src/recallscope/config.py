"""Config files (TOML or JSON) read into, and written from, the dataclasses the library uses.

A config file holds the fields of one config dataclass (``PatchingConfig``, ``TraceConfig``,
``AtPConfig``...) as top-level keys; nested dataclasses are tables. The algorithm:

1. Parse the file by suffix: ``.toml`` (stdlib ``tomllib``) or ``.json``.
2. Check every key against the dataclass's fields; an unknown key is an error that names the valid
   keys and the closest match (a typo never silently falls back to a default).
3. Coerce each value to its field's declared type: enum members from their values (``"z"`` ->
   ``Component.Z``), tuples from lists, floats from integers, nested dataclasses from tables,
   ``None`` where the type allows it (JSON ``null``; in TOML, leave the key out). A value of the wrong
   type is an error naming the field, the value, the expected type and, for enums, the choices.
4. Construct the dataclass (its ``__post_init__`` validation, if any, runs as usual).

:func:`config_to_dict` / :func:`save_config` invert this, so ``load_config(save_config(cfg, p), type(cfg))
== cfg`` for JSON and TOML alike.
"""

import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from recallscope.errors import ConfigError

T = TypeVar("T")

FORMATS = (".toml", ".json")
"""Config file suffixes understood here."""


def _describe(tp: Any) -> str:
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return f"one of {[m.value for m in tp]}"
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to type ``tp``, or a :class:`ConfigError` saying what ``where`` should be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where} = {value!r} is not {_describe(tp)}: " + "; ".join(errors))
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where} = {value!r} is not one of {list(args)}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r} should be a list ({_describe(tp)}).")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{where} = {value!r} should have {len(args)} entries ({_describe(tp)}).")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = [_coerce(v, args[0], f"{where}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} = {value!r} should be a table/object.")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} should be a table of {tp.__name__} fields, got {value!r}.")
        return config_from_dict(tp, value, where=where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where} = {value!r} is not a valid {tp.__name__}; choose one of "
                              f"{[m.value for m in tp]}.") from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where} = {value!r} ({type(value).__name__}) should be {_describe(tp)}.")


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and coercing values (see the module docstring)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{cls!r} is not a config dataclass.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, fields, n=1)) else repr(k)
                 for k in unknown]
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)} for {cls.__name__}; valid keys are "
                          f"{sorted(fields)}.")
    types = typing.get_type_hints(cls)
    values = {k: _coerce(v, types[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: invalid {cls.__name__}: {exc}") from exc


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON/TOML data: enums as their values, tuples as lists."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw table in a ``.toml`` or ``.json`` file, with parse errors reported by file and line."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"cannot read config {str(path)!r}: use a .toml or .json file.")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror or exc}.") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the tomli backport has the same API
                import tomli as tomllib  # type: ignore[no-redef]

            data = tomllib.loads(text)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table/object of config keys, not {type(data).__name__}.")
    return data


def load_config(path: str | os.PathLike, cls: type[T], *, overrides: Mapping[str, Any] | None = None) -> T:
    """Read ``cls`` from a TOML/JSON file; ``overrides`` (e.g. explicit command-line options) win over it."""
    data = {**read_config_file(path), **(overrides or {})}
    return config_from_dict(cls, data, where=str(path))


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)  # JSON numbers and basic strings are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise ConfigError(f"cannot write {where} = {value!r} as TOML; save the config as .json instead.")


def _toml_table(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    lines = [f"{k} = {_toml_value(v, prefix + k)}" for k, v in data.items()
             if v is not None and not isinstance(v, Mapping)]
    for k, v in data.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{prefix}{k}]", *_toml_table(v, f"{prefix}{k}.")]
    return lines


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write a config dataclass to ``.toml`` or ``.json`` (``None`` fields are left out of TOML)."""
    from recallscope.manifest import atomic_write_text

    path = Path(path)
    data = config_to_dict(config)
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=1) + "\n"
    elif path.suffix.lower() == ".toml":
        text = f"# {type(config).__name__}\n" + "\n".join(_toml_table(data)) + "\n"
    else:
        raise ConfigError(f"cannot write config {str(path)!r}: use a .toml or .json file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
