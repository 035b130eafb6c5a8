"""``apo-merge`` with each chunk's write slowed down, so that a test can kill a rank in the middle of a merge
(``torchrun ... tests/merge/dcp_slow_merge.py PREV CUR --alpha A -o OUT``): the torch path's ``torch.save`` of each
chunk and the torch-free path's writes both sleep first."""

import sys
import time

from apo_merge.dcp import fast, torchpath

_save = torchpath._save


def _slow(t, sink):
    time.sleep(0.15)
    return _save(t, sink)


class _SlowWriter(fast.SafetensorsWriter):
    def write(self, data, offset):
        time.sleep(0.05)
        return super().write(data, offset)


if __name__ == "__main__":
    torchpath._save = _slow
    fast.SafetensorsWriter = _SlowWriter
    from apo_merge.cli import main

    sys.argv[0] = "apo-merge"
    main()
