"""An output folder that appears complete or not at all.

Files are written into a hidden temporary folder beside OUT, fsynced, then renamed into place in one step
(RENAME_NOREPLACE, or RENAME_EXCHANGE with --overwrite, so two writers never mix and an old OUT is replaced
atomically). Errors, Ctrl-C and SIGTERM remove the temporary folder; after a kill -9 the next run removes
temporary folders whose owning process is gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path

from apo_merge.errors import MergeError, usage_error

TMP_MARK = ".apo-merge-tmp"
CARD_MARK = "<!-- apo-merge -->"
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(marker: Path) -> bool:
    try:
        pid_text, start = marker.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return True  # not provably ours: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _process_start(pid) == start


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.<OUT>.apo-tmp-*`` folders left by killed runs (only those whose marker proves the owner is gone)."""
    removed = []
    for tmp in out.parent.glob(f".{out.name}.apo-tmp-*"):
        marker = tmp / TMP_MARK
        if tmp.is_dir() and not tmp.is_symlink() and marker.is_file() and not _owner_alive(marker):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True if done; False if the kernel or filesystem lacks renameat2 (caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_replaceable(out: Path) -> None:
    """With --overwrite, only an empty folder or an earlier apo-merge output may be replaced."""
    if not out.is_dir() or out.is_symlink():
        raise usage_error(f"{out}: exists and is not a folder; remove it or choose another -o")
    if not any(out.iterdir()):
        return
    card = out / "README.md"
    try:
        ours = CARD_MARK in card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        ours = False
    if not ours:
        raise usage_error(f"{out}: exists and is not an apo-merge output, so --overwrite will not replace it; "
                          "remove it yourself or choose another -o")


class StagedFolder:
    """``with StagedFolder(out) as tmp: ...write into tmp...; staged.commit()``."""

    def __init__(self, out: Path, overwrite: bool = False) -> None:
        self.out, self.overwrite = Path(out), overwrite
        self.tmp = self.out.parent / f".{self.out.name}.apo-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.committed = False

    def __enter__(self) -> Path:
        remove_stale_temporaries(self.out)
        try:
            self.tmp.mkdir()
            (self.tmp / TMP_MARK).write_text(f"{os.getpid()} {_process_start(os.getpid())}")
        except OSError as e:
            raise MergeError(f"{self.out.parent}: cannot create the output folder there ({e.strerror}); "
                             "check the path and permissions") from None
        return self.tmp

    def commit(self) -> None:
        (self.tmp / TMP_MARK).unlink()
        for f in self.tmp.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(self.tmp)
        if self.out.exists() or self.out.is_symlink():
            if not self.overwrite:
                raise usage_error(f"{self.out}: appeared while merging (another process?); nothing was replaced")
            if not _renameat2(self.tmp, self.out, _RENAME_EXCHANGE):
                old = self.out.parent / f".{self.out.name}.apo-old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.tmp, self.out)
                self.tmp = old
            self.committed = True
            _remove(self.tmp)  # the old OUT now lives here
        else:
            try:
                done = _renameat2(self.tmp, self.out, _RENAME_NOREPLACE)
            except FileExistsError:
                raise usage_error(f"{self.out}: appeared while merging (another process?); "
                                  "nothing was replaced") from None
            if not done:
                if self.out.exists():
                    raise usage_error(f"{self.out}: appeared while merging (another process?); nothing was replaced")
                os.rename(self.tmp, self.out)
            self.committed = True
        _fsync_dir(self.out.parent)

    def __exit__(self, *exc) -> None:
        if not self.committed:
            _remove(self.tmp)
