"""SIGKILL at seeded random moments of a loop of saves: the folder being replaced is never missing or partial."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path


def sigkill_while_saving(
    save: Callable[[int], None],
    folder: Path,
    names: list[str],
    version_of: Callable[[Path], int],
    *,
    trials: int = 20,
    seed: int = 0,
    max_delay: float = 0.3,
) -> list[int]:
    """Fork a child that calls ``save(1)``, ``save(2)``, ... (each replacing ``folder``) until it is SIGKILLed
    after a seeded random delay; ``trials`` times. While the child runs, a watcher checks that every file in
    ``names`` is present in ``folder``; after each kill ``version_of(folder)`` (which must read a complete
    folder) must be the last save that returned or the one in flight. Returns the saves each trial finished.
    """
    rng = random.Random(seed)
    finished = []
    for trial in range(trials):
        ready, done = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save in a loop, one byte on the pipe after each save returns
            try:
                os.close(ready)
                version = 0
                while True:
                    version += 1
                    save(version)
                    os.write(done, b".")
            finally:
                os._exit(1)
        os.close(done)
        try:
            assert os.read(ready, 1) == b".", "the first save did not finish"  # from now on there is an old folder
            gaps: list[str] = []
            stop = threading.Event()
            watcher = threading.Thread(target=_watch, args=(folder, names, stop, gaps))
            watcher.start()
            time.sleep(rng.uniform(0, max_delay))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            stop.set()
            watcher.join()
            saved = 1
            while chunk := os.read(ready, 4096):
                saved += len(chunk)
        finally:
            os.close(ready)
        assert not gaps, f"trial {trial}: {folder} lacked {sorted(set(gaps))} during a save"
        version = version_of(folder)
        assert saved <= version <= saved + 1, f"trial {trial}: {folder} holds save {version}, {saved} had finished"
        finished.append(saved)
    return finished


def _watch(folder: Path, names: list[str], stop: threading.Event, gaps: list[str]) -> None:
    while not stop.is_set():
        gaps.extend(n for n in names if not (folder / n).exists())
