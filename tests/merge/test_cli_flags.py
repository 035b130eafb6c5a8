"""Every flag of every command, with its help, default and choices, against a golden taken before the CLIs were
generated from the option classes (tests/merge/data/cli_flags.json): nothing a user can type or read is lost.

Regenerate only for an intended change: ``python -m tests.merge.test_cli_flags --write``.
"""

from __future__ import annotations

import enum
import json
import re
import sys
from pathlib import Path

import pytest
import typer

from apo_merge import cli
from apo_trainer import cli as train_cli

GOLDEN = Path(__file__).parent / "data" / "cli_flags.json"

# What a change may add to the golden on purpose: (command, flag) -> the key that may differ and why.
INTENDED = {
    # DemoSettings declares the choices of --loss and --restart; the parser now shows and checks them
    ("apo-train demo", "--loss"): {"choices", "type"},
    ("apo-train demo", "--restart"): {"choices", "type"},
}


def _commands() -> dict[str, object]:
    merge = typer.main.get_command(cli.app)
    tools = typer.main.get_command(cli.tools)
    train = typer.main.get_command(train_cli.app)
    found = {"apo-merge": merge, "apo-train": train}
    for name, command in tools.commands.items():
        found[f"apo-merge {name}"] = command
    for name, command in train.commands.items():
        found[f"apo-train {name}"] = command
    return found


def _words(text: str | None) -> str:
    return " ".join((text or "").split())


def _default(value: object) -> object:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return [_default(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _type(annotation: object) -> tuple[str, list | None]:
    """The parser's type as the help shows it, and the choices of an Enum."""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "choice", [m.value for m in annotation]
    name = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return name or str(annotation).replace("typing.", ""), None


def _param(p) -> dict:
    type_name, choices = _type(p.type_descriptor.annotation)
    return {
        "kind": type(p).__name__.lower().replace("typer", ""),
        "decls": sorted([*p.opts, *p.secondary_opts]),
        "help": _words(p.help),
        "required": bool(p.required),
        "default": None if p.required else _default(p.default),
        "show_default": p.show_default,
        "type": type_name,
        "choices": choices,
        "range": [p.min, p.max] if (p.min, p.max) != (None, None) else None,
        "flag": bool(getattr(p, "is_flag", False)),
        "multiple": bool(p.multiple),
        "metavar": p.metavar,
        "eager": bool(p.is_eager),
        "hidden": bool(p.hidden),
    }


def capture() -> dict:
    out = {}
    for name, command in _commands().items():
        params = [_param(p) for p in command.params if p.name != "help"]
        out[name] = {"help": _words(command.help), "params": params}
    return out


def _key(param: dict) -> str:
    return param["decls"][0] if param["kind"] == "option" else param["metavar"] or param["decls"][0]


def test_every_flag_keeps_its_help_default_and_choices():
    golden, now = json.loads(GOLDEN.read_text()), capture()
    assert sorted(now) == sorted(golden), "commands were added or lost"
    for name, command in golden.items():
        assert now[name]["help"] == command["help"], name
        was = {_key(p): p for p in command["params"]}
        got = {_key(p): p for p in now[name]["params"]}
        assert sorted(got) == sorted(was), f"{name}: flags differ"
        for flag, before in was.items():
            allowed = INTENDED.get((name, flag), set())
            after = {k: v for k, v in got[flag].items() if k not in allowed}
            assert after == {k: v for k, v in before.items() if k not in allowed}, f"{name} {flag}"


@pytest.mark.parametrize("name", ["apo-merge", "apo-merge push", "apo-merge verify", "apo-train demo"])
def test_help_pages_show_every_flag_and_its_help(name, monkeypatch):
    """The rendered --help itself (not only the parser's records) names every flag with its help words."""
    monkeypatch.setenv("COLUMNS", "300")
    prog, *sub = name.split()
    app = cli.main if prog == "apo-merge" else train_cli.main
    with pytest.raises(SystemExit) as e:
        _capture_help(app, [*sub, "--help"], monkeypatch)
    assert e.value.code == 0
    text = _words(re.sub(r"[│╭╮╰╯─]", " ", _printed[0]))
    for p in json.loads(GOLDEN.read_text())[name]["params"]:
        for decl in p["decls"] if p["kind"] == "option" else [p["metavar"] or p["decls"][0].upper()]:
            assert decl in text, f"{name}: {decl}"
        # click breaks long words at hyphens ("apo-" / "merge"): compare without the white space
        assert re.sub(r"\s", "", p["help"]) in re.sub(r"\s", "", text), f"{name}: {p['help']}"


_printed: list[str] = []


def _capture_help(main, args, monkeypatch) -> None:
    import io

    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    del _printed[:]
    try:
        main(args)
    finally:
        _printed.append(buffer.getvalue())


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(json.dumps(capture(), indent=1, ensure_ascii=False) + "\n")


def test_a_new_option_is_one_field():
    """cliopts: a field with a help text is a flag (name, help, default, choices), the command gets the object."""
    from dataclasses import dataclass

    from apo_merge.cliopts import setting, takes
    from apo_merge.shell import run_cli, shell_command

    @dataclass(frozen=True)
    class Inner:
        key: str | None = setting(None, "the key")
        level: int = setting(1, "how much", min=0)

    @dataclass(frozen=True)
    class Opts:
        size: int = setting(3, "How big.", min=1)
        mode: str = setting("a", "Which mode.", choices=("a", "b"))
        group: Inner | None = setting(None, "Send it.", group=Inner, key="key", applies_to="sending", metavar="K")
        internal: int = 7  # no help: not an option

    seen = []
    app = typer.Typer(add_completion=False)

    @app.command(cls=shell_command("t"))
    @takes(Opts)
    def command(options: Opts) -> None:
        seen.append(options)

    def run(*args: str) -> int:
        with pytest.raises(SystemExit) as e:
            run_cli("t", app, list(args), owns_process=False)
        return e.value.code

    assert run("--size", "5", "--mode", "b") == 0 and seen[-1] == Opts(size=5, mode="b")
    assert run("--group", "x", "--level", "4") == 0 and seen[-1].group == Inner("x", 4)
    assert run() == 0 and seen[-1] == Opts()
    assert run("--mode", "c") == 2 and run("--internal", "1") == 2 and run("--size", "0") == 2
    assert run("--level", "4") == 2 and len(seen) == 3  # --level applies to sending; add --group K
