"""One config loader for every daemon: defaults < YAML file < STRATA_* environment < overrides.

Each daemon's config is a frozen, keyword-only dataclass that validates itself in
`__post_init__` and defines each default once (with `metadata={"help": ...}`).
This module only moves values into it: it knows the field types, not the keys.

    cfg = load_config(AggregatorConfig, "aggregator.yaml")
    # STRATA_ROUND__MIN_UPDATES=3 sets cfg.round.min_updates

and back: `dump_config(cfg)` is YAML that `load_config` turns into an equal config
(what `strata demo` writes for the daemons it starts).

Supported field types: int, float, bool, str, Path, Literal[...], list[str] /
tuple[str, ...] (comma-separated in the environment), dict (YAML in the
environment), nested dataclasses (sections), and `X | None`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from proto.errors import ConfigError

__all__ = ["ConfigError", "config_to_dict", "describe_config", "dump_config", "env_var_for", "load_config"]

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"", "none", "null"})


def load_config(
    cls: type[T],
    path: str | Path | None,
    *,
    env: Mapping[str, str] = os.environ,
    prefix: str = "STRATA_",
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then env vars, then `overrides`.

    `overrides` may be nested ({"round": {"min_updates": 3}}) or dotted
    ({"round.min_updates": 3}); string values are parsed like env vars, so CLI
    `--set key=value` pairs can be passed straight through.
    """
    _require_dataclass(cls)
    values: dict[str, Any] = {}
    if path is not None:
        _merge(values, _coerce_tree(cls, _read_yaml(Path(path)), f"{path}"), cls)
    _merge(values, _from_env(cls, env, prefix), cls)
    if overrides:
        _merge(values, _coerce_tree(cls, _undot(overrides), "overrides"), cls)
    return _build(cls, values, None, "")


def describe_config(cls: type) -> list[tuple[str, str, str]]:
    """(dotted key, default repr, help) for every leaf key, sections flattened, in field order."""
    _require_dataclass(cls)
    return _describe(cls, None, "")


def _describe(cls: type, defaults: Any, path: str) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        # inside a section, the section's own default instance decides the defaults shown
        default = getattr(defaults, f.name) if defaults is not None else _default_of(f)
        section = _section_type(hints[f.name])
        if section is not None:
            rows += _describe(section, default if isinstance(default, section) else None, f"{path}{f.name}.")
            continue
        shown = "(required)" if default is dataclasses.MISSING else repr(_plain(default))
        rows.append((f"{path}{f.name}", shown, f.metadata.get("help", "")))
    return rows


def env_var_for(key: str, prefix: str = "STRATA_") -> str:
    """The environment variable that sets a dotted key: "round.min_updates" → STRATA_ROUND__MIN_UPDATES."""
    return prefix + "__".join(part.upper() for part in key.split("."))


def config_to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-ready data (dicts, lists, str for paths) for printing the effective config."""
    return _plain(obj)


def dump_config(config: Any) -> str:
    """A config dataclass as a YAML file's text, every key included, sections nested:
    `load_config(type(config), path)` of that file (with no STRATA_* set) equals `config`."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"{config!r} is not a dataclass instance")
    return yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- reading sources


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", reason="config_not_found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def _from_env(cls: type, env: Mapping[str, str], prefix: str, path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{path}{f.name}"
        section = _section_type(hints[f.name])
        if section is not None:
            nested = _from_env(section, env, prefix, f"{key}.")
            if nested:
                out[f.name] = nested
            continue
        name = env_var_for(key, prefix)
        if name in env:
            out[f.name] = _parse_text(env[name], hints[f.name], name)
    return out


def _undot(overrides: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with a value given for {part!r}")
        node[leaf] = value
    return out


# ---------------------------------------------------------------- typing and coercion


def _require_dataclass(cls: type) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass type")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _section_type(tp: Any) -> type | None:
    inner, _ = _strip_optional(tp)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _coerce_tree(cls: type, data: Mapping[str, Any], source: str, path: str = "") -> dict[str, Any]:
    """Check keys against `cls` and convert values to the field types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        name = str(raw_key).replace("-", "_")
        key = f"{path}{name}"
        if name not in fields:
            valid = ", ".join(f"{path}{k}" for k in fields)
            raise ConfigError(f"unknown config key {key!r} in {source}; valid keys: {valid}", reason="unknown_key")
        section = _section_type(hints[name])
        if section is not None and value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} (in {source}) must be a mapping of keys, got {value!r}")
            out[name] = _coerce_tree(section, value, source, f"{key}.")
        else:
            out[name] = _coerce(value, hints[name], f"{key} (in {source})")
    return out


def _parse_text(text: str, tp: Any, where: str) -> Any:
    """An environment / command-line string converted to field type `tp`."""
    inner, optional = _strip_optional(tp)
    if optional and text.strip().lower() in _NONE:
        return None
    origin = typing.get_origin(inner)
    if inner is str or inner is Any:
        return text
    if inner in (list, tuple) or origin in (list, tuple):
        items = [item.strip() for item in text.split(",") if item.strip()]
        return _coerce(items, inner, where)
    if inner is dict or origin is dict:
        try:
            return _coerce(yaml.safe_load(text) or {}, inner, where)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: expected a YAML mapping, got {text!r}") from e
    return _coerce(text, inner, where)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional or inner is Any:
            return None
        raise ConfigError(f"{where} may not be empty")
    origin = typing.get_origin(inner)
    args = typing.get_args(inner)
    if inner is Any:
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}: expected true/false (1/0, yes/no, on/off), got {value!r}")
    if inner is int or inner is float:
        return _coerce_number(value, inner, where)
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if inner is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if origin is typing.Literal:
        if isinstance(value, str) and value not in args:
            # env text for Literal[1, 2] arrives as a string
            match = [a for a in args if str(a) == value]
            value = match[0] if match else value
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if inner in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str):
            return _parse_text(value, inner, where)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if (inner is tuple or origin is tuple) else items
    if inner is dict or origin is dict:
        if isinstance(value, str):
            return _parse_text(value, inner, where)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = args if args else (Any, Any)
        return {
            _coerce(k, key_type, f"{where} key"): _coerce(v, value_type, f"{where}[{k!r}]") for k, v in value.items()
        }
    if isinstance(inner, type) and isinstance(value, inner):
        return value
    raise ConfigError(f"{where}: cannot use {value!r} for a field of type {inner!r}")


def _coerce_number(value: Any, kind: type[int] | type[float], where: str) -> int | float:
    """An int field takes ints (or their text); a float field takes ints and floats (or their text). Never a bool."""
    accepted = (int,) if kind is int else (int, float)
    if isinstance(value, accepted) and not isinstance(value, bool):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")


# ---------------------------------------------------------------- building


def _merge(into: dict[str, Any], new: Mapping[str, Any], cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in new.items():
        section = _section_type(hints[key])
        if section is not None and isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, section)
        else:
            into[key] = value


def _build(cls: type[T], values: Mapping[str, Any], base: Any, path: str) -> T:
    """Construct `cls` from `values`, starting from `base` (or the dataclass defaults)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        section = _section_type(hints[f.name])
        if section is not None and isinstance(value, dict):
            # start from the field's own default section, so a non-default section default survives
            current = getattr(base, f.name) if base is not None else _default_of(f)
            start = current if isinstance(current, section) else None
            value = _build(section, value, start, f"{path}{f.name}.")
        kwargs[f.name] = value
    try:
        if base is not None:
            return dataclasses.replace(base, **kwargs)
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        missing = [
            f"{path}{f.name}"
            for f in dataclasses.fields(cls)
            if f.init and f.name not in kwargs and _default_of(f) is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"missing required config key(s): {', '.join(missing)}", reason="missing_key") from e
        raise ConfigError(f"invalid config for {path or cls.__name__}: {e}") from e
    except ValueError as e:
        raise ConfigError(f"invalid config for {path or cls.__name__}: {e}") from e


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
