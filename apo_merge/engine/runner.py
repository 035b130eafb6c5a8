"""A generic stage runner: each stage on its own thread, the first error stops the others, the caller only waits."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class Stopped(Exception):
    """Raised inside a stage when another stage failed."""


class StageRunner:
    """Stages added with ``add`` run on worker threads by ``run``, which returns once every one has ended and
    re-raises the first error any of them raised (the others are stopped at their next ``get``)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stages: list[tuple[str, Callable[[], None]]] = []

    def add(self, name: str, stage: Callable[[], None]) -> None:
        self._stages.append((name, stage))

    def get(self, q: queue.Queue) -> Any:
        """``q.get()`` that gives up (raises ``Stopped``) once another stage has failed."""
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    raise Stopped() from None

    def _guard(self, stage: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                stage()
            except Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                with self._lock:
                    if self.error is None:
                        self.error = e
                self.stop.set()

        return run

    def run(self) -> None:
        # Every stage runs in a worker thread; the main thread, where Ctrl-C and SIGTERM land, only waits. A
        # signal raised inside a stage's queue call could strike between acquiring the queue's lock and the
        # block that releases it, leaving the lock held and the other stages blocked forever (a hang seen once
        # in 50 interrupted merges under load, when the main thread ran a compute worker).
        threads = [threading.Thread(target=self._guard(fn), name=name, daemon=True) for name, fn in self._stages]
        try:
            for t in threads:  # inside the try: a signal landing between two starts must stop the started ones
                t.start()
            _join(threads)
        except BaseException:  # Ctrl-C while joining: stop the other stages before the caller cleans up
            self.stop.set()
            _join(threads)
            raise
        if self.error is not None:
            raise self.error


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        while t.is_alive():  # short joins keep Ctrl-C responsive; a thread never started is not alive
            t.join(timeout=0.1)
