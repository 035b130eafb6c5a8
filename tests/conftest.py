"""Suite-wide hooks: the GPU tests skipped without CUDA; the fast tests first and the ``slow`` ones as a second
pass (a broken build shows in the first minute); the time each pass took, under the slowest tests (``--durations``
in pyproject's addopts), so that the suite's cost is on every run's last screen."""

from __future__ import annotations

import time

import pytest
import torch

from tests.checkpoints import make_checkpoint  # noqa: F401  (re-exported for tests)

_SLOW = pytest.StashKey[set]()  # node ids of the slow tests
_SECONDS = pytest.StashKey[dict]()  # "fast" / "slow" -> [tests, seconds]


def _is_slow(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None  # not item.keywords: it holds folder names


def pytest_collection_modifyitems(config, items):
    items.sort(key=_is_slow)  # stable: fast first, then slow, each in collection order
    config.stash[_SLOW] = {item.nodeid for item in items if _is_slow(item)}
    config.stash[_SECONDS] = {"fast": [0, 0.0], "slow": [0, 0.0]}
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds folder names (a checkout "gpu")
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    part = "slow" if item.nodeid in item.config.stash.get(_SLOW, ()) else "fast"
    first_slow = part == "slow" and item.config.stash[_SECONDS]["slow"][0] == 0
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    if first_slow and reporter is not None and item.config.stash[_SECONDS]["fast"][0]:
        reporter.ensure_newline()
        reporter.write_sep("-", "slow tests (marker slow)")
    start = time.perf_counter()  # setup, call and teardown: module fixtures count where they are built
    yield
    count = item.config.stash[_SECONDS][part]
    count[0] += 1
    count[1] += time.perf_counter() - start


@pytest.hookimpl(trylast=True)  # after --durations: the last lines of the run
def pytest_terminal_summary(terminalreporter, config):
    seconds = config.stash.get(_SECONDS, None)
    if not seconds or not any(n for n, _ in seconds.values()):
        return
    terminalreporter.write_sep("=", "suite time")
    for part, (n, s) in seconds.items():
        terminalreporter.write_line(f"{part}: {n} tests in {s:.1f} s")
