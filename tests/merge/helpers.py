"""Shared tools for the reliability tests: hand-built safetensors files, tree hashes, running the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def st_bytes(header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file's bytes: 8-byte length (``length`` to lie about it), header JSON (or raw bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def st_tensors(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> bytes:
    """A valid file from {name: (dtype, shape, raw bytes)}, tensors laid out in the given order."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    data, pos = b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        data += raw
        pos += len(raw)
    return st_bytes(header, data)


def tree_state(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Path -> sha256 of content (or symlink target / file type) for everything under ``root``."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                state[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(mode):
                state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                state[rel] = f"mode:{stat.S_IFMT(mode)}"
    return state


def assert_damage_refused(root: Path, prev: Path, cur: Path, damage, needle: str, alpha: float = 0.3) -> None:
    """After ``damage()``: the merge of ``prev`` and ``cur`` into ``root/out`` fails with one line naming
    ``needle``, leaves no output or staging folder, and changes nothing under ``root`` (the inputs)."""
    damage()
    before = tree_state(root)
    res = run_cli_in_process(prev, cur, "--alpha", alpha, "-o", root / "out")
    assert_one_line_error(res, (1, 2), needle)
    assert not (root / "out").exists() and not leftovers(root / "out")
    assert tree_state(root) == before


def leftovers(out: Path) -> list[str]:
    """Temporary or swapped-out folders an apo-merge run into ``out`` left beside it."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.apo-"))


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("COLUMNS", None)
    env["PYTHONFAULTHANDLER"] = "1"  # a crash or a test's SIGABRT of a hung child prints every thread's stack
    return env


def apo_merge_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "apo_merge", *map(str, args)]


def run_cli(*args: object, timeout: float = 120, **kwargs) -> Result:
    """Run ``python -m apo_merge ARGS`` in a fresh process."""
    p = subprocess.run(
        apo_merge_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=cli_env(), **kwargs
    )
    return Result(p.returncode, p.stdout, p.stderr)


def run_cli_in_process(*args: object) -> Result:
    """The same command line through the real entry point ``apo_merge.cli.main`` in this process (fast: no
    interpreter or torch start-up): its routing, its shell, its exit code and what it prints.

    An exception other than SystemExit would have been a traceback.
    """
    from apo_merge.cli import main

    return run_main(main, *args)


def run_main(main, *args: object) -> Result:
    """``main(argv)`` of a console script with stdout and stderr captured; its exit code from SystemExit."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_line_error(res: Result, code: int | tuple[int, ...], *needles: str) -> str:
    """The run failed with ``code``, printing exactly one line on stderr (no traceback) that holds ``needles``."""
    codes = code if isinstance(code, tuple) else (code,)
    assert res.code in codes, (res.code, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("apo-merge: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line
