"""A Hugging Face Hub cache filled locally, in the documented layout that huggingface_hub itself writes.

models--{org}--{name}/blobs/<id> holds file contents (id: sha256 for LFS files, the git blob sha1 for others),
snapshots/<commit>/<file> are relative symlinks ../../blobs/<id>, refs/<branch> holds the commit hash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin")


def blob_id(name: str, data: bytes) -> str:
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fill_cache(
    cache: Path,
    repo_id: str,
    folder: Path,
    commit: str,
    refs: tuple[str, ...] = ("main",),
    extra_tree: dict[str, bytes] | None = None,
) -> Path:
    """Put ``folder``'s files into ``cache`` as commit ``commit`` of ``repo_id``; return the snapshot folder.

    ``extra_tree``: files the commit has on the Hub but the cache lacks (recorded in the cached tree listing,
    which huggingface_hub checks before it returns a snapshot offline).
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    tree = {}
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        bid = blob_id(f.name, data)
        (blobs / bid).write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blobs / bid, snapshot))
        tree[f.name] = (len(data), bid)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    if extra_tree is not None:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

        entries = {
            n: TreeCacheEntry(
                size=s,
                blob_id=b,
                lfs_sha256=b if n.endswith(LFS_SUFFIXES) else None,
                lfs_size=s if n.endswith(LFS_SUFFIXES) else None,
            )
            for n, (s, b) in tree.items()
        }
        for n, data in extra_tree.items():
            b = blob_id(n, data)
            entries[n] = TreeCacheEntry(
                size=len(data),
                blob_id=b,
                lfs_sha256=b if n.endswith(LFS_SUFFIXES) else None,
                lfs_size=len(data) if n.endswith(LFS_SUFFIXES) else None,
            )
        write_tree_cache(str(repo), commit, entries)
    return snapshot
