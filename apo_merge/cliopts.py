"""Command-line options generated from a frozen options class (as mergekit's ``add_merge_options``, for Typer).

Each field declared with ``setting(default, help, ...)`` is one option: its flag (``--max-shard-size`` for
``max_shard_size``), help, default and choices come from the field, and the command is handed the built object::

    @app.command()
    @takes(MergeOptions)
    def merge(prev: str, options: MergeOptions) -> None: ...

A new option is one field. The class checks its own values (``__post_init__``), so the Python API and the CLI
refuse the same values with the same words. Fields without a help text are not options.

What ``setting`` takes besides the default and the help: ``choices`` (the parser shows and checks them),
``flag`` (the declarations where they differ from the field's name: ``"-o"``-style short names, a
``--x/--no-x`` pair), ``metavar``, ``min``, ``type`` (what the parser reads, where the default does not tell),
``parse`` (the parser's value -> the field's value; raise a UserError), ``text`` (the default as the parser shows
it), ``show_default``, ``argument`` (positional), ``group`` (the field holds another options class whose fields
are options too), ``key`` (with ``group``: this field's flag sets that field of the group, and the group is made
only when it is given) and ``applies_to`` (what the group's other flags need ``key`` for, for the error).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from apo_merge.errors import UserError, usage_error

_KEYS = frozenset(
    [
        "choices",
        "flag",
        "metavar",
        "min",
        "type",
        "parse",
        "text",
        "show_default",
        "argument",
        "group",
        "key",
        "applies_to",
    ]
)


def setting(default: Any = MISSING, help: str = "", *, repr: bool = True, **cli: Any) -> Any:
    """A dataclass field that is also a command-line option (see the module's docstring for ``cli``)."""
    unknown = sorted(set(cli) - _KEYS)
    if unknown:
        raise TypeError(f"setting() got unknown keys {unknown}")
    metadata = {"help": help, "choices": cli.pop("choices", None), **cli}
    if default is MISSING and cli.get("group") is not None:
        return field(default_factory=cli["group"], repr=repr, metadata=metadata)
    if isinstance(default, (dict, list)):
        return field(default_factory=functools.partial(copy.deepcopy, default), repr=repr, metadata=metadata)
    return field(default=default, repr=repr, metadata=metadata)


def options_of(cls: type) -> dict[str, Field]:
    """The fields of ``cls`` that are options, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


@functools.cache  # one class per field: the default and the parser's type must be members of the same Enum
def choice_enum(name: str, choices: tuple[str, ...]) -> type[Enum]:
    """A str Enum of a field's choices, for the option parser (which shows and checks them)."""
    return Enum(name.title().replace("_", ""), {v: v for v in choices}, type=str)


@dataclass(frozen=True)
class _Flag:
    name: str  # the command's keyword
    field: Field  # where the help, flag and parser come from
    path: tuple[str, ...]  # where the value goes: ("alpha",), ("push_to_hub", "repo_id")
    default: Any  # what the parser starts from


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return ...  # required
    text = f.metadata.get("text")
    if text is not None:
        return text(value)
    choices = f.metadata.get("choices")
    return choice_enum(f.name, choices)(value) if choices and value is not None else value


def _flags(cls: type, path: tuple[str, ...] = ()) -> list[_Flag]:
    found = []
    for f in options_of(cls).values():
        group, key = f.metadata.get("group"), f.metadata.get("key")
        if group is None:
            found.append(_Flag(f.name, f, (*path, f.name), _default(f)))
            continue
        if key is not None:  # e.g. --push-to-hub REPO_ID sets PushOptions.repo_id
            found.append(_Flag(f.name, f, (*path, f.name, key), None))
        found += [g for g in _flags(group, (*path, f.name)) if g.path[-1] != key]
    return found


def _parser(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def callback(value: Any) -> Any:  # the class's own error, worded by the parser as an invalid value of the flag
        try:
            return parse(value)
        except UserError as e:
            raise typer.BadParameter(e.message) from None

    return callback


def _type(flag: _Flag) -> Any:
    meta, default = flag.field.metadata, flag.default
    if meta.get("type") is not None:
        kind = meta["type"]
    elif meta.get("choices"):
        kind = choice_enum(flag.field.name, meta["choices"])
    elif default is None or default is ...:
        kind = str
    else:
        kind = Path if isinstance(default, Path) else type(default)
    return kind | None if default is None else kind


def parameter(flag: _Flag) -> inspect.Parameter:
    """The command parameter of one option: its type, and the typer.Option (or Argument) that documents it."""
    meta = flag.field.metadata
    common = {"help": meta["help"], "metavar": meta.get("metavar"), "show_default": meta.get("show_default", True)}
    if meta.get("min") is not None:
        common["min"] = meta["min"]
    if meta.get("argument"):
        info = typer.Argument(**common)
    else:
        decls = meta.get("flag") or "--" + flag.field.name.replace("_", "-")
        parse = meta.get("parse")
        callback = _parser(parse) if parse is not None else None
        info = typer.Option(*((decls,) if isinstance(decls, str) else decls), callback=callback, **common)
    return inspect.Parameter(
        flag.name, inspect.Parameter.KEYWORD_ONLY, default=flag.default, annotation=Annotated[_type(flag), info]
    )


def option(cls: type, name: str) -> Any:
    """The ``Annotated`` type of one field's option, for a command that takes that field alone (e.g. --token)."""
    flag = next(f for f in _flags(cls) if f.name == name)
    return parameter(flag).annotation


def takes(cls: type, name: str = "options") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command's parameter ``name`` becomes one option per field of ``cls``; the command is
    called with the built object there (the fields' own checks run first, as for any caller)."""
    flags = _flags(cls)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(fn)
        params = []
        for p in own.parameters.values():
            params += [parameter(f) for f in flags] if p.name == name else [_resolved(p, fn)]
        names = [p.name for p in params]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice or name not in own.parameters:
            raise TypeError(f"{fn.__name__}: parameter {name!r} missing, or names given twice: {twice}")

        @functools.wraps(fn)
        def command(**values: Any) -> Any:
            given = {f.path: values.pop(f.name) for f in flags}
            values[name] = build(cls, flags, given)
            return fn(**values)

        command.__signature__ = own.replace(parameters=params)  # what typer reads
        command.__annotations__ = {}  # typer would otherwise re-read fn's own, where `name` is the class
        return command

    return decorate


def _resolved(p: inspect.Parameter, fn: Callable[..., Any]) -> inspect.Parameter:
    # the command's own parameters, annotations evaluated as typer would (`name`'s is never read: it may be local)
    annotation = eval(p.annotation, fn.__globals__) if isinstance(p.annotation, str) else p.annotation  # noqa: S307
    return p.replace(kind=p.KEYWORD_ONLY, annotation=annotation)


def build(cls: type, flags: list[_Flag], given: dict[tuple[str, ...], Any]) -> Any:
    """``cls`` from the parser's values (keyed by path); a keyed group whose key flag is missing is None, and
    its other flags must then be left at their defaults."""
    return _make(cls, (), {f.path: f for f in flags}, given)


def _make(cls: type, path: tuple[str, ...], flags: dict[tuple[str, ...], _Flag], given: dict) -> Any:
    kwargs = {}
    for f in options_of(cls).values():
        here = (*path, f.name)
        group, key = f.metadata.get("group"), f.metadata.get("key")
        if group is None:
            value = given[here]
            kwargs[f.name] = value.value if isinstance(value, Enum) else value
        elif key is not None and given[(*here, key)] is None:
            _refuse_without_key(f, here, flags, given)
            kwargs[f.name] = None
        else:
            kwargs[f.name] = _make(group, here, flags, given)
    return cls(**kwargs)


def _refuse_without_key(f: Field, here: tuple[str, ...], flags: dict, given: dict) -> None:
    for path, value in given.items():
        if path[: len(here)] == here and value != flags[path].default:
            need = f"{flag_name(f)} {f.metadata.get('metavar') or ''}".strip()
            decl = flag_name(flags[path].field)
            raise usage_error(f"{decl} applies to {f.metadata['applies_to']}; add {need}")


def flag_name(f: Field) -> str:
    """The long flag of a field's option (``--push-to-hub``; the first of a ``--x/--no-x`` pair)."""
    decls = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return max([decls] if isinstance(decls, str) else decls, key=len).split("/")[0]
