"""Config files (TOML or YAML) read into the same dataclasses the CLI options fill.

``fedsplit train --config run.toml`` takes every :class:`~fedsplit.client.config.TrainConfig`
field from the file (``serve`` and ``simulate`` likewise); options given on the command line
win. A file may hold the fields at its top level or under a table named after the command
(``[train]``). A field whose option is parsed from text (``memory_budget = "4GiB"``,
``layers = "0:30"``) takes that text in a file too. Every mistake — a
syntax error, an unknown key, a value of the wrong type — is a :class:`ConfigError` whose
message names the file and the key, and says what would be accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file the user has to fix; the message is one line."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.toml``, ``.yaml`` or ``.yml`` file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError(f"{path}: not valid YAML{line} ({problem})") from None
        data = {} if data is None else data
    else:
        raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _accepts(hint: Any, value: Any) -> tuple[bool, Any]:
    """(ok, converted value) for a value read from a file against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, converted = _accepts(arg, value)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if isinstance(
            value, (int, float)
        ) else value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        inner = typing.get_args(hint)
        items = [_accepts(inner[0] if inner else Any, v) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    return True, value  # Any or a type we do not check


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def dataclass_values(data: dict[str, Any], cls: type, path: str | Path, section: str | None = None) -> dict:
    """Validate ``data`` (or its ``section`` table) against the fields of dataclass ``cls``."""
    if section and isinstance(data.get(section), dict):
        data = data[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{path}: unknown key {raw_key!r}{hint}")
        parse = fields[key].metadata.get("parse")
        if parse is not None and isinstance(value, str):  # memory_budget = "4GiB", as on the command line
            try:
                value = parse(value)
            except ValueError as exc:
                raise ConfigError(f"{path}: {raw_key!r} {exc}") from None
        ok, converted = _accepts(hints[key], value)
        if not ok:
            raise ConfigError(f"{path}: {raw_key!r} must be {_type_name(hints[key])}, got {value!r}")
        values[key] = converted
    return values


def load_dataclass_file(path: str | Path, cls: type, section: str | None = None) -> dict[str, Any]:
    """Read and validate a config file for ``cls``; returns the field values it sets."""
    return dataclass_values(read_config_file(path), cls, path, section)
