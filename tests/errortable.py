"""The table of every user-facing error in docs/errors.md, read from the code itself.

Every construction of a ``UserError`` (``MergeError``, ``usage_error``, ``TrainError``, ``ConfigError``) or of a
parser error (``typer.BadParameter``) in apo_merge and apo_trainer is one row: its exit code (the class's default,
or the ``exit_code`` the call passes) and its message with the computed parts shown as ``{expression}``.
tests/merge/test_cli.py checks that docs/errors.md holds exactly this table; after changing an error, run
``python -m tests.errortable --write`` and review the diff.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from apo_merge import errors as merge_errors
from apo_merge.errors import EXIT_USAGE, MergeError, usage_error
from apo_merge.shell import StdoutLost
from apo_trainer.errors import ConfigError, TrainError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
PACKAGES = ("apo_merge", "apo_trainer")
HEADING = "## Every message"

# The exit code of each constructor when the call passes none: taken from the classes, not restated here.
DEFAULT_CODES = {
    "UserError": merge_errors.UserError("x").exit_code,
    "StdoutLost": StdoutLost("x").exit_code,
    "MergeError": MergeError("x").exit_code,
    "usage_error": usage_error("x").exit_code,
    "TrainError": TrainError("x").exit_code,
    "ConfigError": ConfigError("x").exit_code,
    "BadParameter": EXIT_USAGE,  # an option's value, reported by the parser's own path in run_cli
}
CONSTANTS = {name: getattr(merge_errors, name) for name in dir(merge_errors) if name.startswith("EXIT_")}


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _text(node: ast.expr, src: str) -> str:
    """The message as a template: literal parts as they are, computed parts as ``{source}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v, src) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return "{" + (ast.get_source_segment(src, node.value) or "?") + "}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left, src) + _text(node.right, src)
    return "{" + (ast.get_source_segment(src, node) or "?") + "}"


def _code(call: ast.Call, name: str) -> int:
    given = next((k.value for k in call.keywords if k.arg == "exit_code"), None)
    if given is None and name in ("UserError", "StdoutLost", "TrainError", "ConfigError") and len(call.args) > 1:
        given = call.args[1]
    if given is None:
        return DEFAULT_CODES[name]
    if isinstance(given, ast.Constant) and isinstance(given.value, int):
        return given.value
    if isinstance(given, ast.Name) and given.id in CONSTANTS:
        return CONSTANTS[given.id]
    raise AssertionError(f"exit code {ast.dump(given)} is not a literal or an EXIT_ constant")


def rows() -> list[tuple[int, str, str]]:
    """(exit code, message template, module) for every error the code raises, sorted."""
    found = set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            src = path.read_text(encoding="utf-8")
            module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
            if module == "apo_merge.errors":
                continue  # the definitions themselves
            for node in ast.walk(ast.parse(src)):  # raised at once, or built by a helper and raised by its caller
                if not isinstance(node, ast.Call) or _name(node.func) not in DEFAULT_CODES or not node.args:
                    continue
                message = " ".join(_text(node.args[0], src).split())
                found.add((_code(node, _name(node.func)), message, module))
    return sorted(found)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    lines = ["| exit | message | raised in |", "|---:|---|---|"]
    lines += [f"| {code} | {_cell(message)} | `{module}` |" for code, message, module in rows()]
    return "\n".join(lines) + "\n"


def documented() -> tuple[str, str]:
    """docs/errors.md split into the hand-written part and the generated table after HEADING."""
    text = DOC.read_text(encoding="utf-8")
    head, sep, tail = text.partition(HEADING + "\n")
    assert sep, f"{DOC} has no '{HEADING}' section"
    intro, _, generated = tail.partition("\n| exit |")
    return head + sep + intro + "\n", ("| exit |" + generated) if generated else ""


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        head, _ = documented()
        DOC.write_text(head + table(), encoding="utf-8")
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(table())
