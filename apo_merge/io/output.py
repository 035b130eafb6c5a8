"""An output folder that appears complete or not at all.

Files are written into a hidden temporary folder beside OUT, fsynced, then renamed into place in one step
(RENAME_NOREPLACE, or RENAME_EXCHANGE with --overwrite, so two writers never mix and an old OUT is replaced
atomically). Errors, Ctrl-C and SIGTERM remove the temporary folder; after a kill -9 the next run removes
temporary folders whose owning process is gone. The folder's name carries the owner's pid and start time, so the
proof of ownership exists from the moment mkdir returns until the folder is gone (a marker file inside would leave
unprovable folders behind when a kill lands between mkdir and its write).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path

from apo_merge.errors import MergeError
from apo_merge.io.files import RENAME_NOREPLACE, fsync_dir, fsync_tree, remove, renameat2, replace_atomically
from apo_merge.io.header import read_regular_file

CARD_MARK = "<!-- apo-merge -->"
MAX_CARD_BYTES = 1 << 26  # a card lists every weight file: generous, but a bound
_TMP_SUFFIX = re.compile(r"(\d+)-(\d+)-[0-9a-f]{8}")  # <pid>-<process start time>-<random>


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.apo-tmp-"


def _owner_gone(suffix: str) -> bool:
    """True only when ``suffix`` is ``<pid>-<start>-<random>`` and that process no longer exists."""
    m = _TMP_SUFFIX.fullmatch(suffix)
    if not m:
        return False  # not provably ours: leave it
    pid, start = int(m.group(1)), m.group(2)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    now = _process_start(pid)
    return now is not None and start != "0" and now != start  # the pid was reused by another process


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.<OUT>.apo-tmp-<pid>-<start>-<random>`` folders whose owning process is gone (killed runs)."""
    removed = []
    prefix = _temp_prefix(out)
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for tmp in entries:
        if (
            tmp.name.startswith(prefix)
            and _owner_gone(tmp.name[len(prefix) :])
            and tmp.is_dir()
            and not tmp.is_symlink()
        ):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


_IO_FIXES = {  # errno -> (what it means here, or "", what to do)
    errno.ENOSPC: ("", "free space or choose another -o"),
    errno.EDQUOT: ("", "free space or choose another -o"),
    errno.EFBIG: (
        " (a file would exceed the file-size limit, ulimit -f, or the filesystem's maximum)",
        "raise the limit, write smaller shards with --max-shard-size, or choose another -o",
    ),
    errno.EACCES: ("", "check the permissions of the output's parent folder"),
    errno.EPERM: ("", "check the permissions of the output's parent folder"),
    errno.EROFS: ("", "choose another -o"),
    errno.EIO: ("", "check the disks (dmesg) and rerun"),
}


def io_error(e: OSError, out: Path) -> MergeError:
    """A one-line MergeError for an OSError met while merging into ``out``: the cause and what to do about it."""
    meaning, fix = _IO_FIXES.get(e.errno, ("", "check free space and permissions, then rerun"))
    code = f" [{errno.errorcode.get(e.errno, e.errno)}]" if e.errno else ""
    at = f" at {e.filename}" if e.filename else ""
    return MergeError(f"{out}: merge failed: {e.strerror or e}{code}{meaning}{at}; {fix}")


def _is_ours(folder: Path) -> bool:
    """An empty folder, or one whose README.md (a regular file) is an apo-merge model card."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        text = read_regular_file(folder / "README.md", MAX_CARD_BYTES)
    except (OSError, MergeError):
        return False
    return CARD_MARK in text.decode("utf-8", errors="replace")


def check_replaceable(out: Path) -> None:
    """With --overwrite, only an empty folder or an earlier apo-merge output may be replaced."""
    if not out.is_dir() or out.is_symlink():
        raise MergeError(f"{out}: exists and is not a folder; remove it or choose another -o")
    if not _is_ours(out):
        raise MergeError(
            f"{out}: exists and is not an apo-merge output, so --overwrite will not replace it; "
            "remove it yourself or choose another -o"
        )


class StagedFolder:
    """``with StagedFolder(out) as tmp: ...write into tmp...; staged.commit()``."""

    def __init__(self, out: Path, overwrite: bool = False) -> None:
        self.out, self.overwrite = Path(out), overwrite
        pid = os.getpid()
        self.tmp = self.out.parent / f"{_temp_prefix(self.out)}{pid}-{_process_start(pid) or 0}-{secrets.token_hex(4)}"
        self.committed = False
        self.replaced = False  # whether commit replaced an existing OUT (--overwrite)

    def __enter__(self) -> Path:
        remove_stale_temporaries(self.out)
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise MergeError(
                f"{self.out.parent}: cannot create the output folder there ({e.strerror}); "
                "check the path and permissions"
            ) from None
        return self.tmp

    def commit(self) -> None:
        if self.out.exists() or self.out.is_symlink():
            if not self.overwrite:
                raise MergeError(f"{self.out}: appeared while merging (another process?); nothing was replaced")
            # What comes out is checked at the exchange, not only at the start: a folder put at OUT during the
            # merge is the user's, and goes back in place.
            if not replace_atomically(self.tmp, self.out, old_ok=_is_ours):
                raise MergeError(
                    f"{self.out}: was replaced during the merge by something that is not an apo-merge output; "
                    "it was left in place and nothing was written; remove it yourself or choose another -o"
                )
            self.committed = self.replaced = True
            return
        fsync_tree(self.tmp)
        try:
            done = renameat2(self.tmp, self.out, RENAME_NOREPLACE)
        except FileExistsError:
            raise MergeError(f"{self.out}: appeared while merging (another process?); nothing was replaced") from None
        if not done:
            if self.out.exists():
                raise MergeError(f"{self.out}: appeared while merging (another process?); nothing was replaced")
            os.rename(self.tmp, self.out)
        self.committed = True
        fsync_dir(self.out.parent)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            remove(self.tmp)
        if isinstance(exc, OSError):
            raise io_error(exc, self.out) from None
