"""PrimaryTree.open_handle: a changed file reached by its kernel file handle (live mode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fsops import fanotify
from fsops import gfid as gfids
from fsops.primary import PrimaryTree

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at needs root"),
              pytest.mark.timeout(30)]


def _handle_and_gfid(path: Path) -> tuple[bytes, bytes]:
    st = os.lstat(path)
    g = gfids.ensure_gfid(os.fsencode(path), st.st_ino, st=st)
    return fanotify.name_to_handle_at(os.fsencode(path)), g


def test_a_file_under_another_name_is_opened(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"content")
    handle, g = _handle_and_gfid(f)
    (tmp_path / "d").mkdir()
    os.link(f, tmp_path / "d" / "b")
    os.unlink(f)  # the handle's name is gone; the object lives on as d/b
    tree = PrimaryTree(os.fsencode(tmp_path))
    fd = tree.open_handle(handle, g)
    assert fd is not None
    try:
        assert os.pread(fd, 100, 0) == b"content"
        e = tree.entry_of_fd(fd, g)
        assert (e.size, e.gfid, e.type) == (7, g, "f")
    finally:
        os.close(fd)
    assert tree.open_handle(handle, b"\x01" * 16) is None  # another gfid: not this object


def test_a_fifo_is_not_opened_and_does_not_block(tmp_path: Path) -> None:
    """A fifo's open for reading would wait for a writer: it must never be opened."""
    p = tmp_path / "fifo"
    os.mkfifo(p)
    handle, g = _handle_and_gfid(p)
    tree = PrimaryTree(os.fsencode(tmp_path))
    assert tree.open_handle(handle, g) is None


def test_a_removed_file_is_none(tmp_path: Path) -> None:
    f = tmp_path / "gone"
    f.write_bytes(b"x")
    handle, g = _handle_and_gfid(f)
    os.unlink(f)
    tree = PrimaryTree(os.fsencode(tmp_path))
    assert tree.open_handle(handle, g) is None
