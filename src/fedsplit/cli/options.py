"""Typer options generated from a config dataclass, so each option is declared once: as a field.

:func:`config_options` decorates a command. Every field of the dataclass becomes an option:
flag ``--field-name``, type from the annotation (``X | None`` allowed), default from the
field, help from ``metadata["help"]``; a bool field that defaults to False is a plain flag
(``--resume``). Field metadata may also say:

- ``parse``: the option takes text and this function turns it into the field's value
  (``"A:B"``, ``"4GiB"``, ``"0,20,50"``); it raises ``ValueError`` with what the option takes,
  which ends the command with ``error: --flag <that message>``. ``format`` turns a value
  back into that text (for the default shown in ``--help``); plain ``str`` or a comma list
  when absent.
- ``metavar``, ``envvar`` and ``flags`` (more names, e.g. ``("-s",)``).

The command function declares its other options as usual (``--local``, ``--json``) and one
parameter, ``cfg`` by default, that receives the config object built from the fields.
With ``section=`` the command also takes ``--config FILE`` (TOML or YAML): the file's keys
fill the fields and options given on the command line win.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import fail


@dataclasses.dataclass(frozen=True)
class Binding:
    """What :func:`config_options` attached to a command (as ``__fedsplit_binding__``), for checks."""

    cls: type  # each field of it is the option flag_of(field.name)
    extras: tuple[str, ...]  # the command's own options (parameter names)
    defaults: dict[str, Any]  # per-command defaults that replace the field's


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def field_default(f: dataclasses.Field) -> Any:
    """The default a field gives a config object built with no arguments."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default: a command option needs one")


def flag_of(name: str) -> str:
    """The option a field named ``name`` gets."""
    return "--" + name.replace("_", "-")


def _as_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _option(f: dataclasses.Field, hint: Any, default: Any, owner: str) -> tuple[Any, Any]:
    """(annotation, typer.Option) for one field."""
    meta = f.metadata
    if not meta.get("help"):
        raise TypeError(f"{owner}.{f.name} needs metadata={{'help': ...}}: it is a command option")
    names = (flag_of(f.name), *meta.get("flags", ()))
    common = dict(help=meta["help"], envvar=meta.get("envvar"), metavar=meta.get("metavar"))
    base, optional = _unwrap_optional(hint)
    if "parse" in meta:
        text = None if default is None else meta.get("format", _as_text)(default)
        return Optional[str], typer.Option(text, *names, **common)
    if base is bool and not optional:
        if default:
            return bool, typer.Option(True, f"{names[0]}/--no-{names[0][2:]}", *names[1:], **common)
        return bool, typer.Option(False, *names, **common)
    if base not in (int, float, str):
        raise TypeError(f"{owner}.{f.name}: a {hint} option needs metadata 'parse' (text -> value)")
    return (Optional[base] if optional else base), typer.Option(default, *names, **common)


def _parse(f: dataclasses.Field, raw: Any) -> Any:
    parse = f.metadata.get("parse")
    if parse is None or raw is None:
        return raw
    try:
        return parse(raw)
    except ValueError as exc:
        fail(f"{flag_of(f.name)} {exc}")


def _given(ctx: typer.Context, name: str) -> bool:
    # by name: typer may bring its own copy of click's ParameterSource
    return getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def config_options(
    cls: type,
    *,
    into: str = "cfg",
    defaults: dict[str, Any] | None = None,
    section: str | None = None,
) -> Callable[[Callable], Callable]:
    """Decorate a Typer command: the fields of dataclass ``cls`` become its options.

    The command's parameter ``into`` receives ``cls(**values)``; in ``--help`` the fields
    stand where that parameter stands. The command's other parameters stay options of their
    own (its extras). ``defaults`` replaces field defaults for this command only (e.g. an
    output folder). ``section`` adds ``--config FILE``, read with
    :func:`fedsplit.cli.config.load_dataclass_file` under that table name.
    """
    defaults = dict(defaults or {})
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    unknown = set(defaults) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)} to give defaults")
    keyword = inspect.Parameter.KEYWORD_ONLY
    generated = []
    for f in fields:
        default = defaults[f.name] if f.name in defaults else field_default(f)
        annotation, option = _option(f, hints[f.name], default, cls.__name__)
        generated.append(inspect.Parameter(f.name, keyword, default=option, annotation=annotation))

    def decorate(func: Callable) -> Callable:
        own = inspect.signature(func, eval_str=True).parameters
        if into not in own:
            raise TypeError(f"{func.__name__} needs a parameter {into!r} for the {cls.__name__}")
        clash = {f.name for f in fields} & set(own)
        if clash:
            raise TypeError(f"{func.__name__}: {sorted(clash)} are fields of {cls.__name__} already")
        params = []
        for name, p in own.items():
            params.extend(generated if name == into else [p.replace(kind=keyword)])
        extras = tuple(n for n, p in own.items() if n != into and p.annotation is not typer.Context)
        ctx_name = next((n for n, p in own.items() if p.annotation is typer.Context), None)
        passes_ctx = ctx_name is not None
        if section is not None:
            extras += ("config",)
            option = typer.Option(
                None,
                "--config",
                help=f"TOML or YAML file of {section} options (the fields of {cls.__name__}, at its top "
                f"or in a table named {section}); options on the command line win",
            )
            params.append(inspect.Parameter("config", keyword, default=option, annotation=Optional[Path]))
            if ctx_name is None:  # needed to tell options given on the command line from defaults
                ctx_name = "_fedsplit_ctx"
                params.append(inspect.Parameter(ctx_name, keyword, annotation=typer.Context))

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            ctx = kwargs[ctx_name] if passes_ctx else kwargs.pop(ctx_name, None)
            path = kwargs.pop("config", None) if section is not None else None
            values = {f.name: _parse(f, kwargs.pop(f.name)) for f in fields}
            if path is not None:
                from .config import load_dataclass_file

                from_file = load_dataclass_file(path, cls, section)
                values.update({k: v for k, v in from_file.items() if not _given(ctx, k)})
            return func(**kwargs, **{into: cls(**values)})

        del command.__wrapped__  # typer must read the signature below, not the function's own
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__fedsplit_binding__ = Binding(cls, extras, defaults)
        return command

    return decorate
