"""``apo-merge`` with each chunk's write slowed down, so that a test can kill a rank in the middle of a merge
(``torchrun ... tests/merge/dcp_slow_merge.py PREV CUR --alpha A -o OUT``)."""

import sys
import time

from apo_merge.dcp import merge

_save = merge._save


def _slow(t, sink):
    time.sleep(0.15)
    return _save(t, sink)


if __name__ == "__main__":
    merge._save = _slow
    from apo_merge.cli import main

    sys.argv[0] = "apo-merge"
    main()
