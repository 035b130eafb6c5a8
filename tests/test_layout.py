"""Product, tests and dev scripts stay apart: nothing but tests/bench imports bench/ (the dev scripts)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports_bench(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "bench" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "bench":
            return True
    return False


def test_only_tests_of_bench_import_bench():
    sources = [
        p for d in ("apo_kernels", "apo_merge", "apo_trainer", "tests", "examples") for p in ROOT.glob(f"{d}/**/*.py")
    ]
    assert len(sources) > 50
    offenders = [str(p.relative_to(ROOT)) for p in sources if "bench" not in p.parts and _imports_bench(p)]
    assert not offenders, f"{offenders} import bench/: move the test to tests/bench/ or the code out of bench/"
