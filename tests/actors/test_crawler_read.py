"""The Crawler's inline reads start the reads of a window of small files before reading
any of them (``actors.crawler._open_ahead``): real files, the real page cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from actors.crawler import _open_ahead, _read_small
from fsops import gfid as gfids
from tests.support.pagecache import evict, resident_pages


def test_open_ahead_starts_reading_every_file_of_the_window(tmp_path: Path) -> None:
    names = [b"f%02d" % i for i in range(32)]
    for n in names:
        (tmp_path / os.fsdecode(n)).write_bytes(os.urandom(64 << 10))
    for n in names:
        evict(tmp_path / os.fsdecode(n))
    if any(any(resident_pages(tmp_path / os.fsdecode(n))) for n in names):
        pytest.skip("the file system keeps these files cached")
    (tmp_path / "link").symlink_to("f00")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fds = _open_ahead(dir_fd, [*names, b"gone", b"link"])
    try:
        assert fds[-2] is None and fds[-1] is None  # missing; a symlink is never followed
        # Nothing reads these files here: only the advice can bring their pages in.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cold = [n for n in names if not all(resident_pages(tmp_path / os.fsdecode(n)))]
            if not cold:
                break
            time.sleep(0.01)
        assert cold == [], f"{len(cold)} of {len(names)} files not read ahead"
        # The files opened ahead are read from those descriptors, by the usual checks.
        first = fds[0]
        assert first is not None
        g = gfids.ensure_gfid(first, os.fstat(first).st_ino)
        data, st = _read_small(dir_fd, names[0], g, first)
        assert data == (tmp_path / "f00").read_bytes() and st is not None
        assert _read_small(dir_fd, names[0], os.urandom(16), first) == (None, None)
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        os.close(dir_fd)
