"""fsync helpers and the one atomic replace of a file or folder.

``replace_atomically`` is how every writer in the house puts a finished result in place (the merge's output
folder, apo-train's run store, APOCallback's raw weights): the new content is made durable first, then exchanged
with the old in one step (renameat2 RENAME_EXCHANGE), so that a crash at any moment leaves the old or the new
content at the final path, never neither.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder below a folder (symlinks are not followed)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        if not path.is_symlink():
            fsync_file(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(Path(root, name))
        fsync_dir(Path(root))


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True if done; False if the kernel or filesystem lacks renameat2 (the caller falls back)."""
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


def remove(path: Path) -> None:
    """Remove a file, symlink or folder tree; missing is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_atomically(tmp: Path, final: Path, *, old_ok: Callable[[Path], bool] | None = None) -> bool:
    """Put the finished file or folder ``tmp`` at ``final`` in one step, replacing what is there.

    ``tmp`` is fsynced first; an existing ``final`` is exchanged with it (renameat2 RENAME_EXCHANGE), the parent
    folder fsynced, and only then is the old content (now at ``tmp``) removed. Without renameat2 (old kernels,
    some filesystems) a folder is moved aside to ``.<name>.apo-old-<pid>`` and the new one renamed in: the old
    content then survives a crash under that name. ``tmp`` and ``final`` must be in the same folder.

    ``old_ok(path)`` is asked about the old content once it is out of the way (what was at ``final`` at the
    moment of the exchange, not at some earlier check); when it says no, the old content goes back to ``final``,
    the new back to ``tmp``, and the result is False.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old, exchanged = None, False
    if os.path.lexists(final):
        if renameat2(tmp, final, RENAME_EXCHANGE):
            old, exchanged = tmp, True
        elif final.is_dir() and not final.is_symlink():
            old = final.parent / f".{final.name}.apo-old-{os.getpid()}"
            remove(old)
            os.rename(final, old)
            os.rename(tmp, final)
        else:
            old = None if old_ok is None else final.parent / f".{final.name}.apo-old-{os.getpid()}"
            if old is not None:  # a file to check first: move it aside, as for a folder
                os.rename(final, old)
                os.rename(tmp, final)
            else:
                os.replace(tmp, final)  # a file over a file: rename is atomic
    else:
        os.replace(tmp, final)
    if old is not None and old_ok is not None and not old_ok(old):
        if exchanged:
            renameat2(tmp, final, RENAME_EXCHANGE)
        else:
            os.rename(final, tmp)
            os.rename(old, final)
        return False
    fsync_dir(final.parent)
    if old is not None:
        remove(old)
    return True
