"""Identity of objects that cannot carry the gfid xattr (unprivileged operation).

``fsops.gfid.xattrless`` is forced true (as for a non-root process) for the primary-side
tests; the secondary tests run with the process's real privileges, since the replacement
of a "same gfid, other kind or target" object does not depend on them.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from fsops import gfid as gfids
from fsops.constants import ROOT_GFID
from fsops.secondary import SecondaryFS

R = ROOT_GFID


@pytest.fixture
def unprivileged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gfids, "is_root", lambda: False)


def _gfid(d: Path, name: str) -> bytes:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return gfids.ensure_gfid(name.encode(), st.st_ino, dir_fd=dfd, st=st)
    finally:
        os.close(dfd)


def test_derived_gfid_is_stable_and_shared(tmp_path: Path, unprivileged: None) -> None:
    os.symlink("target", tmp_path / "l")
    g = _gfid(tmp_path, "l")
    assert g == _gfid(tmp_path, "l")
    os.link(tmp_path / "l", tmp_path / "l2", follow_symlinks=False)
    assert _gfid(tmp_path, "l2") == g  # hardlinks share it
    os.rename(tmp_path / "l", tmp_path / "renamed")
    assert _gfid(tmp_path, "renamed") == g  # a rename keeps it
    assert not os.listxattr(tmp_path / "renamed", follow_symlinks=False)
    os.mkfifo(tmp_path / "f")
    assert _gfid(tmp_path, "f") not in (g, None)
    # read_gfid gives the same answer when told the object's stat
    st = os.lstat(tmp_path / "renamed")
    assert gfids.read_gfid(os.fsencode(tmp_path / "renamed"), st.st_ino, st=st) == g


def test_derived_gfid_of_a_reused_inode(tmp_path: Path) -> None:
    os.symlink("one", tmp_path / "a")
    st = os.lstat(tmp_path / "a")
    same = gfids.derived_gfid(st, b"one")
    assert gfids.derived_gfid(st, b"two") != same  # a new target on the same inode
    fifo = os.stat_result((stat.S_IFIFO | 0o600, *st[1:]))
    assert gfids.derived_gfid(fifo) != same  # another kind on the same inode


def test_regular_files_still_use_the_xattr(tmp_path: Path, unprivileged: None) -> None:
    (tmp_path / "f").write_bytes(b"x")
    g = _gfid(tmp_path, "f")
    st = os.lstat(tmp_path / "f")
    assert g != gfids.derived_gfid(st)
    assert gfids.read_gfid(os.fsencode(tmp_path / "f"), st.st_ino) == g


def _G() -> bytes:
    return uuid.uuid4().bytes


def test_secondary_replaces_same_gfid_with_other_target(tmp_path: Path) -> None:
    root = tmp_path / "sec"
    with SecondaryFS(bytes(root), create=True) as fs:
        g = _G()
        assert fs.ensure(R, b"a", g, "l", target=b"first") == "created"
        # the same gfid elsewhere with another target: a new object, not a link of "a"
        assert fs.ensure(R, b"b", g, "l", target=b"second") == "created"
        assert os.readlink(root / "b") == "second"
        assert os.readlink(root / "a") == "first"
        assert fs.ensure(R, b"b", g, "l", target=b"second") == "kept"
        # ... and with another kind, at the same name
        assert fs.ensure(R, b"b", g, "p") == "created"
        assert stat.S_ISFIFO(os.lstat(root / "b").st_mode)
        # a name occupied by something else, the gfid known with another target
        g2 = _G()
        assert fs.ensure(R, b"c", g2, "l", target=b"old") == "created"
        assert fs.ensure(R, b"d", _G(), "f", data=b"x") == "created"
        assert fs.ensure(R, b"d", g2, "l", target=b"new") == "created"
        assert os.readlink(root / "d") == "new"
        # the same target is still the same object: linked
        assert fs.ensure(R, b"e", g2, "l", target=b"new") == "linked"
        assert os.lstat(root / "e").st_ino == os.lstat(root / "d").st_ino
