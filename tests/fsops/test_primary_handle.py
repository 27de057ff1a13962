"""PrimaryTree.open_handle: a changed file reached by its kernel file handle (live mode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fsops import fanotify
from fsops import gfid as gfids
from fsops.constants import GFID_XATTR
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


def test_gfid_of_says_whether_it_minted(tmp_path: Path) -> None:
    """Minted: a gfid assigned by this call (no xattr before, or one copied from another
    inode); an object read with its own gfid is not."""
    f = tmp_path / "f"
    f.write_bytes(b"x")
    ino = f.stat().st_ino
    first, minted = gfids.gfid_of(bytes(f), ino)
    assert minted
    assert gfids.gfid_of(bytes(f), ino) == (first, False)
    assert gfids.ensure_gfid(bytes(f), ino) == first
    # Copied (cp --preserve=xattr) onto another inode: that one gets its own, minted.
    g = tmp_path / "g"
    g.write_bytes(b"x")
    os.setxattr(g, GFID_XATTR.decode(), os.getxattr(f, GFID_XATTR.decode()))
    other, minted = gfids.gfid_of(bytes(g), g.stat().st_ino)
    assert minted and other != first
