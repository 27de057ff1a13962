"""open_beneath: the kernel refuses symlinks and escapes, with and without openat2."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fsops import resolve
from fsops.resolve import open_beneath


@pytest.fixture(params=[True, False], ids=["openat2", "walk"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if not request.param:
        monkeypatch.setattr(resolve, "_have_openat2", False)
    return bool(request.param)


def test_opens_beneath_and_refuses_symlinks_and_escapes(tmp_path: Path, mode: bool) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "f").write_bytes(b"x")
    os.symlink("/etc", tmp_path / "a" / "l")
    base = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_beneath(base, b"a/b", os.O_RDONLY | os.O_DIRECTORY)
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "a" / "b"))
        os.close(fd)
        for bad in (b"a/l", b"a/l/passwd", b"../x", b"a/../../x"):
            with pytest.raises(OSError) as ei:
                open_beneath(base, bad, os.O_RDONLY)
            assert ei.value.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR), bad
        if mode:  # absolute paths are refused by openat2 itself
            with pytest.raises(OSError):
                open_beneath(base, b"/etc/passwd", os.O_RDONLY)
    finally:
        os.close(base)
