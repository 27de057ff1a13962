"""Tests of fsops.blocks on real files (ext4/tmpfs under tmp_path)."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsops import blocks
from fsops.blocks import (
    SIG_SIZE,
    block_sig,
    block_sigs,
    data_extents,
    handle_hole,
    handle_sigs,
    handle_truncate,
    handle_write,
    open_for_read,
    punch_hole,
    syncfs,
    zero_sig,
)
from tests.support.pagecache import resident_bytes

MiB = 1 << 20


def _ref_sigs(data: bytes, offset: int, length: int, block: int) -> bytes:
    part = data[offset : offset + length]
    return b"".join(
        xxhash.xxh3_128_digest(part[i : i + block])
        for i in range(0, len(part), block)
    )


def test_open_for_read_noatime_and_nofollow(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    fd = open_for_read(bytes(f))
    try:
        assert os.read(fd, 10) == b"hello"
        assert os.fstat(fd).st_atime_ns == 1_000_000_000
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)
    (tmp_path / "link").symlink_to(f)
    with pytest.raises(OSError):
        open_for_read(bytes(tmp_path / "link"))
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_for_read(b"f", dir_fd=dfd)
        os.close(fd)
    finally:
        os.close(dfd)


def test_data_extents_sparse(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 64 * MiB)
        os.pwrite(fd, b"a" * MiB, 8 * MiB)
        os.pwrite(fd, b"b" * MiB, 40 * MiB)
        ext = list(data_extents(fd, 64 * MiB))
        assert ext == [(8 * MiB, MiB), (40 * MiB, MiB)]
        # clipped to the given size
        assert list(data_extents(fd, 40 * MiB + 100)) == [(8 * MiB, MiB), (40 * MiB, 100)]
        assert list(data_extents(fd, 64 * MiB, start=8 * MiB + 10)) == [
            (8 * MiB + 10, MiB - 10),
            (40 * MiB, MiB),
        ]
        assert list(data_extents(fd, 0)) == []
    finally:
        os.close(fd)


def test_data_extents_dense_and_empty(tmp_path: Path) -> None:
    f = tmp_path / "dense"
    f.write_bytes(b"x" * 10000)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert list(data_extents(fd, 10000)) == [(0, 10000)]
    finally:
        os.close(fd)
    e = tmp_path / "empty"
    e.write_bytes(b"")
    fd = os.open(e, os.O_RDONLY)
    try:
        assert list(data_extents(fd, 0)) == []
    finally:
        os.close(fd)


def test_punch_hole_keeps_size_reads_zero(tmp_path: Path) -> None:
    f = tmp_path / "f"
    data = os.urandom(4 * MiB)
    f.write_bytes(data)
    fd = os.open(f, os.O_RDWR)
    try:
        before = os.fstat(fd).st_blocks
        punch_hole(fd, MiB, 2 * MiB)
        st = os.fstat(fd)
        assert st.st_size == 4 * MiB
        assert st.st_blocks < before
        got = os.pread(fd, 4 * MiB, 0)
        assert got == data[:MiB] + bytes(2 * MiB) + data[3 * MiB :]
        assert list(data_extents(fd, 4 * MiB)) == [(0, MiB), (3 * MiB, MiB)]
        punch_hole(fd, 0, 0)  # no-op
    finally:
        os.close(fd)


def test_punch_hole_unaligned(tmp_path: Path) -> None:
    f = tmp_path / "f"
    data = os.urandom(20000)
    f.write_bytes(data)
    fd = os.open(f, os.O_RDWR)
    try:
        punch_hole(fd, 100, 9000)
        assert os.pread(fd, 30000, 0) == data[:100] + bytes(9000) + data[9100:]
    finally:
        os.close(fd)


@pytest.mark.parametrize("block", [16, 1000, 4096, 128 * 1024])
def test_block_sigs_matches_reference(tmp_path: Path, block: int) -> None:
    data = os.urandom(300_001)
    f = tmp_path / "f"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        for off, length in [(0, len(data)), (5, 70_000), (block, 3 * block + 7), (0, 10**9)]:
            assert block_sigs(fd, off, length, block) == _ref_sigs(data, off, length, block)
        assert block_sigs(fd, len(data), 100, block) == b""
        assert block_sigs(fd, 0, 0, block) == b""
    finally:
        os.close(fd)


def test_block_sigs_sparse_uses_zero_sig(tmp_path: Path) -> None:
    f = tmp_path / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        size = 10 * MiB + 12345
        os.ftruncate(fd, size)
        payload = os.urandom(300_000)
        os.pwrite(fd, payload, 3 * MiB + 17)
        data = bytearray(size)
        data[3 * MiB + 17 : 3 * MiB + 17 + len(payload)] = payload
        for block in (4096, 128 * 1024, 100_000):
            got = block_sigs(fd, 0, size, block)
            assert got == _ref_sigs(bytes(data), 0, size, block)
            got = block_sigs(fd, 1000, size, block)
            assert got == _ref_sigs(bytes(data), 1000, size, block)
    finally:
        os.close(fd)


def test_block_sig_is_xxh3_128() -> None:
    """The wire format of protocol 2, pinned by XXH3-128's reference value for no input
    (seed 0, canonical big-endian) and a stable value for b"abc"."""
    assert block_sig(b"") == bytes.fromhex("99aa06d3014798d86001c324468d497f")
    assert block_sig(b"abc") == bytes.fromhex("06b05ab6733a618578af5f94892f3950")
    assert block_sig(memoryview(bytearray(b"abc"))) == block_sig(b"abc")
    assert len(block_sig(os.urandom(1000))) == SIG_SIZE == 16


def test_zero_sig() -> None:
    assert zero_sig(0) == xxhash.xxh3_128_digest(b"")
    assert zero_sig(4096) == xxhash.xxh3_128_digest(bytes(4096))
    assert zero_sig(4096) is zero_sig(4096)


def test_handlers(tmp_path: Path) -> None:
    f = tmp_path / "dst"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert handle_write(fd, 10, b"abc") == 3
        assert handle_write(fd, 0, memoryview(b"xy")) == 2
        assert os.pread(fd, 100, 0) == b"xy" + bytes(8) + b"abc"
        r = handle_sigs(fd, 0, 100, 4)
        assert r["size"] == 13
        assert r["mtime"] == os.fstat(fd).st_mtime_ns
        assert r["sigs"] == _ref_sigs(b"xy" + bytes(8) + b"abc", 0, 13, 4)
        assert handle_sigs(fd, 20, 100, 4)["sigs"] == b""
        handle_hole(fd, 0, 2)
        assert os.pread(fd, 100, 0) == bytes(10) + b"abc"
        handle_truncate(fd, 5)
        assert os.fstat(fd).st_size == 5
        handle_truncate(fd, 1 << 30)
        st = os.fstat(fd)
        assert st.st_size == 1 << 30 and st.st_blocks <= 16
        syncfs(fd)
    finally:
        os.close(fd)


def test_syncfs_bad_fd() -> None:
    with pytest.raises(OSError):
        syncfs(-1)


def test_read_buffer_reused() -> None:
    a = blocks._read_buffer(100)
    b = blocks._read_buffer(50)
    assert a.obj is b.obj


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(max_size=3000),
    offset=st.integers(0, 3100),
    length=st.integers(0, 4000),
    block=st.integers(1, 700),
)
def test_block_sigs_property(
    tmp_path: Path, data: bytes, offset: int, length: int, block: int
) -> None:
    f = tmp_path / "p"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert block_sigs(fd, offset, length, block) == _ref_sigs(data, offset, length, block)
    finally:
        os.close(fd)


# -- large writes around the page cache (O_DIRECT) --------------------------------------------


@pytest.mark.parametrize(("offset", "length", "buffer_size"), [
    (0, 4 * MiB, 8 * MiB),                 # aligned, one buffer
    (1000, 3 * MiB + 123, 8 * MiB),        # unaligned head and tail
    (4096 * 7, 2 * MiB + 4096, 64 << 10),  # many buffer-fulls
    (5, 1 * MiB + 8191, 1 * MiB),          # aligned middle just at DIRECT_MIN
])
def test_large_write_goes_around_the_page_cache(tmp_path: Path, offset: int, length: int,
                                               buffer_size: int) -> None:
    f = tmp_path / "dst"
    data = os.urandom(length)
    w = blocks.DirectWriter(buffer_size)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"keep", 0)  # buffered data before the range survives
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert w.write(fd, offset, memoryview(data)) == length
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == fl  # O_DIRECT only for the call
    finally:
        os.close(fd)
    middle = (offset + length) // 4096 * 4096 - -(-offset // 4096) * 4096
    assert w.direct_bytes == middle
    # Only the buffered head, tail and the 4 bytes before can be cached (a page each).
    assert resident_bytes(f) <= 3 * 4096
    got = f.read_bytes()
    assert got[offset:] == data and len(got) == offset + length
    assert got[:4] == (b"keep" if offset >= 4 else b"keep"[:offset] + data[: 4 - offset])


def test_write_below_the_threshold_stays_buffered(tmp_path: Path) -> None:
    f = tmp_path / "dst"
    data = os.urandom(blocks.DIRECT_MIN - 4096)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert handle_write(fd, 0, data) == len(data)
    finally:
        os.close(fd)
    assert resident_bytes(f) == len(data)
    assert f.read_bytes() == data


def test_handle_write_of_a_large_payload_is_direct(tmp_path: Path) -> None:
    f = tmp_path / "dst"
    data = os.urandom(3 * MiB)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        before = blocks._direct_writer().direct_bytes
        assert handle_write(fd, 0, data) == len(data)
        assert blocks._direct_writer().direct_bytes - before == len(data)
        # Cached pages of the range (an earlier buffered write) are not left stale.
        handle_write(fd, MiB, b"x" * 4096)
        assert handle_write(fd, 0, data) == len(data)
    finally:
        os.close(fd)
    assert f.read_bytes() == data


def test_direct_writes_off_by_environment(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOREP_DIRECT_WRITES", "0")
    w = blocks.DirectWriter()
    f = tmp_path / "dst"
    data = os.urandom(2 * MiB)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert w.write(fd, 0, memoryview(data)) == len(data)
    finally:
        os.close(fd)
    assert w.direct_bytes == 0 and resident_bytes(f) == len(data)
    assert f.read_bytes() == data


def test_file_system_refusing_o_direct_gets_buffered_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``fcntl(F_SETFL, O_DIRECT)`` fails with EINVAL (file systems without direct
    I/O), the write is buffered and the device is not asked again."""
    real = fcntl.fcntl
    asked: list[int] = []

    def refusing(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            asked.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(blocks.fcntl, "fcntl", refusing)
    w = blocks.DirectWriter()
    f = tmp_path / "dst"
    data = os.urandom(2 * MiB + 100)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert w.write(fd, 100, memoryview(data)) == len(data)
        assert w.write(fd, 100, memoryview(data)) == len(data)
        assert w.refused == {os.fstat(fd).st_dev}
    finally:
        os.close(fd)
    assert len(asked) == 1 and w.direct_bytes == 0
    assert f.read_bytes() == bytes(100) + data


def test_direct_write_refused_part_way_finishes_buffered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose direct writes fail with EINVAL after the first one (an alignment
    stricter than 4 KiB at some offsets): the rest of the write is buffered, the content
    is whole, and the device is not asked again."""
    real = os.pwrite
    direct_calls: list[int] = []

    def pwrite(fd: int, data: memoryview | bytes, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_calls.append(offset)
            if len(direct_calls) == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(blocks.os, "pwrite", pwrite)
    w = blocks.DirectWriter(256 << 10)
    f = tmp_path / "dst"
    data = os.urandom(2 * MiB + 10)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert w.write(fd, 0, memoryview(data)) == len(data)
        assert w.direct_bytes == 256 << 10
        assert w.refused == {os.fstat(fd).st_dev}
        assert w.write(fd, 0, memoryview(data)) == len(data)
        assert len(direct_calls) == 2
    finally:
        os.close(fd)
    assert f.read_bytes() == data
