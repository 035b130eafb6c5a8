"""apo_merge.io: the one atomic replace, the weight-suffix list and the shared writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from apo_merge.io import files
from apo_merge.io.files import replace_atomically
from apo_merge.io.hashing import hash_file
from apo_merge.io.writer import SafetensorsWriter


def _folder(path: Path, **content: str) -> Path:
    path.mkdir()
    for name, text in content.items():
        (path / name).write_text(text)
    return path


def _state(parent: Path) -> dict[str, dict[str, str]]:
    return {
        p.name: {f.name: f.read_text() for f in p.iterdir()} if p.is_dir() else p.read_text() for p in parent.iterdir()
    }


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_replace_atomically_replaces_folders_and_files_and_leaves_nothing_behind(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "renameat2", lambda *a: False)  # an old kernel or a filesystem without it
    _folder(tmp_path / "out", a="old", b="old")
    replace_atomically(_folder(tmp_path / ".tmp-out", a="new"), tmp_path / "out")
    assert _state(tmp_path) == {"out": {"a": "new"}}
    replace_atomically(_folder(tmp_path / ".tmp-fresh", x="1"), tmp_path / "fresh")  # nothing there yet
    (tmp_path / "f").write_text("old")
    (tmp_path / ".tmp-f").write_text("new")
    replace_atomically(tmp_path / ".tmp-f", tmp_path / "f")
    assert _state(tmp_path) == {"out": {"a": "new"}, "fresh": {"x": "1"}, "f": "new"}


def test_replace_atomically_fsyncs_the_new_content_before_the_exchange_and_the_parent_after(tmp_path, monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(files, "fsync_file", lambda p: events.append(f"file {Path(p).name}"))
    monkeypatch.setattr(files, "fsync_dir", lambda p: events.append(f"dir {Path(p).name}"))
    real = files.renameat2
    monkeypatch.setattr(files, "renameat2", lambda *a: events.append("exchange") or real(*a))
    _folder(tmp_path / "out", a="old")
    replace_atomically(_folder(tmp_path / ".tmp", a="new"), tmp_path / "out")
    assert events == ["file a", "dir .tmp", "exchange", f"dir {tmp_path.name}"]


def test_writer_writes_at_offsets_and_reserves_the_size(tmp_path):
    header = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    w = SafetensorsWriter(tmp_path / "f", header, len(header) + 6)
    w.write(b"def", len(header) + 3)
    w.write(memoryview(b"abc"), len(header))
    w.finish()
    data = (tmp_path / "f").read_bytes()
    assert data == header + b"abcdef" and hash_file(tmp_path / "f")[0] == len(data)
    with pytest.raises(FileExistsError):  # never writes over an existing file
        SafetensorsWriter(tmp_path / "f", header, len(header))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_replace_atomically_puts_back_what_the_check_refuses(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "renameat2", lambda *a: False)
    _folder(tmp_path / "out", a="user's")
    seen: list[str] = []

    def old_ok(old: Path) -> bool:
        seen.append((old / "a").read_text())
        return False

    assert not replace_atomically(_folder(tmp_path / ".tmp", a="new"), tmp_path / "out", old_ok=old_ok)
    assert seen == ["user's"] and _state(tmp_path) == {"out": {"a": "user's"}, ".tmp": {"a": "new"}}
    assert replace_atomically(tmp_path / ".tmp", tmp_path / "out", old_ok=lambda old: True)
    assert _state(tmp_path) == {"out": {"a": "new"}}
