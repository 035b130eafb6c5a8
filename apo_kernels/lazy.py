"""One package face for the three packages: names exported lazily, so that importing a package starts no torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: each name in ``exports`` is loaded from its module on first use.

    Usage in a package's ``__init__``: ``__getattr__, __dir__ = lazy_exports(__name__, {"name": "pkg.module"})``.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            globals_ = importlib.import_module(package).__dict__
            globals_[name] = value  # cached: the next lookup does not come here
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
