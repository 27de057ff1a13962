"""Tests of fsops.transfer.push_file against the real secondary handlers on real files.

The "RPC" here dispatches in-process to fsops.blocks.handle_* on a destination file the test
opened, returning already-completed futures; nothing is mocked.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsops import transfer
from fsops.blocks import (
    handle_hole,
    handle_sigs,
    handle_truncate,
    handle_write,
    open_for_read,
    punch_hole,
)
from fsops.transfer import FileChanged, TransferStats, push_file
from tests.support.pagecache import evict, resident_pages

MiB = 1 << 20
GFID = b"\x11" * 16
BLOCK = 128 * 1024


class LocalRpc:
    """Applies protocol requests to ``dst_fd`` with the real secondary handlers, in order."""

    def __init__(self, dst_fd: int, hook: Callable[[str, dict], None] | None = None) -> None:
        self.fd = dst_fd
        self.hook = hook
        self.calls: list[str] = []

    def __call__(self, method: str, args: dict, payload: bytes | None) -> concurrent.futures.Future:
        self.calls.append(method)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._run(fut, method, args, payload)
        return fut

    def _run(
        self, fut: concurrent.futures.Future, method: str, args: dict, payload: bytes | None
    ) -> None:
        try:
            assert args["gfid"] == GFID
            if self.hook is not None:
                self.hook(method, args)
            if method == "data_sigs":
                result: object = handle_sigs(self.fd, args["offset"], args["length"], args["block"])
            elif method == "data_write":
                assert payload is not None
                result = handle_write(self.fd, args["offset"], payload)
            elif method == "data_hole":
                handle_hole(self.fd, args["offset"], args["length"])
                result = None
            elif method == "data_finish":
                handle_truncate(self.fd, args["size"])
                meta = args["meta"]
                os.utime(self.fd, ns=(meta["atime"], meta["mtime"]))
                result = None
            else:
                raise ValueError(method)
        except Exception as e:
            fut.set_exception(e)
        else:
            fut.set_result(result)


class _Reply(concurrent.futures.Future):
    """A reply that arrives only when waited for: the requests queued before it are then
    applied, in order, as the secondary's single applier thread would."""

    def __init__(self, rpc: DeferredRpc, method: str, args: dict) -> None:
        super().__init__()
        self.rpc, self.method, self.args = rpc, method, args

    def result(self, timeout: float | None = None) -> object:
        self.rpc.waits.append((self.method, self.args.get("offset"), self.rpc.issued_sigs))
        self.rpc.apply_through(self)
        return super().result(timeout)


class DeferredRpc(LocalRpc):
    """LocalRpc whose requests are applied lazily, in order, when a reply is first needed."""

    def __init__(self, dst_fd: int, hook: Callable[[str, dict], None] | None = None) -> None:
        super().__init__(dst_fd, hook)
        self.queue: list[tuple[_Reply, bytes | None]] = []
        #: (method, offset, data_sigs requests issued so far) each time a reply is awaited.
        self.waits: list[tuple[str, int | None, int]] = []
        self.issued_sigs = 0

    def __call__(self, method: str, args: dict, payload: bytes | None) -> concurrent.futures.Future:
        self.calls.append(method)
        self.issued_sigs += method == "data_sigs"
        fut = _Reply(self, method, args)
        self.queue.append((fut, payload))
        return fut

    def apply_through(self, fut: _Reply) -> None:
        while not fut.done():
            head, payload = self.queue.pop(0)
            self._run(head, head.method, head.args, payload)


def _meta(fd: int) -> dict:
    st = os.fstat(fd)
    return {
        "mode": st.st_mode & 0o7777,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "atime": st.st_atime_ns,
        "mtime": st.st_mtime_ns,
    }


def _push(
    src: Path,
    dst: Path,
    *,
    full: bool = False,
    hook: Callable[[str, dict], None] | None = None,
    deferred: bool = False,
    remote_size: int | None = None,
    **kw: int,
) -> tuple[TransferStats, LocalRpc]:
    stats = TransferStats()
    sfd = open_for_read(bytes(src))
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        rpc = (DeferredRpc if deferred else LocalRpc)(dfd, hook)
        remote = None if full else os.fstat(dfd).st_size
        if remote_size is not None:
            remote = remote_size
        push_file(rpc, GFID, sfd, meta=_meta(sfd), remote_size=remote, stats=stats, **kw)
    finally:
        os.close(sfd)
        os.close(dfd)
    return stats, rpc


def _same(a: Path, b: Path) -> bool:
    sa, sb = a.stat(), b.stat()
    if sa.st_size != sb.st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


def _rand_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def test_full_copy_random(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _rand_file(src, 5 * MiB + 12345)
    os.utime(src, ns=(1_500_000_000_000_000_000, 1_600_000_000_123_456_789))
    stats, rpc = _push(src, dst, full=True)
    assert _same(src, dst)
    assert dst.stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert stats.bytes_sent == 5 * MiB + 12345
    assert stats.writes == -(-(5 * MiB + 12345) // transfer.MAX_WRITE)
    assert stats.files == 1
    assert "data_sigs" not in rpc.calls
    assert rpc.calls[-1] == "data_finish"


def test_full_copy_empty_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"")
    stats, _ = _push(src, dst, full=True)
    assert dst.read_bytes() == b""
    assert stats.writes == 0 and stats.files == 1


def _bytes_read() -> int:
    """Bytes this process passed through read/pread so far (``rchar`` of /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(f.readline().split()[1])


def test_full_copy_sparse_256m(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    fd = os.open(src, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 256 * MiB)
        for off in (0, 37 * MiB + 4096, 200 * MiB, 256 * MiB - 100_000):
            os.pwrite(fd, os.urandom(100_000), off)
    finally:
        os.close(fd)
    r0 = _bytes_read()
    stats, _ = _push(src, dst, full=True)
    assert _bytes_read() - r0 < 1 * MiB  # the four data extents only, no hole read
    assert _same(src, dst)
    assert dst.stat().st_blocks <= src.stat().st_blocks + 8
    assert stats.bytes_sent < 1 * MiB
    # A delta pass over the same sparse pair sends nothing and reads no hole, on either side
    # (both run in this process): only the blocks holding the 4 data extents (<= 2 blocks
    # each, per side) are read to be hashed.
    r1 = _bytes_read()
    stats, _ = _push(src, dst)
    assert _bytes_read() - r1 <= 2 * 4 * 2 * BLOCK
    assert stats.bytes_sent == 0 and stats.holes_punched == 0
    assert stats.bytes_matched == 256 * MiB
    assert dst.stat().st_blocks <= src.stat().st_blocks + 8


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("big")
    _rand_file(base / "orig", 64 * MiB)
    return base / "orig"


def _copy(orig: Path, tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copyfile(orig, src)
    shutil.copyfile(orig, dst)
    return src, dst


def test_delta_identical(big_pair: Path, tmp_path: Path) -> None:
    src, dst = _copy(big_pair, tmp_path)
    stats, _ = _push(src, dst)
    assert stats.bytes_sent == 0 and stats.writes == 0
    assert stats.bytes_matched == 64 * MiB
    assert stats.sig_bytes == 64 * MiB // BLOCK * 16


def test_delta_overwrite_middle(big_pair: Path, tmp_path: Path) -> None:
    src, dst = _copy(big_pair, tmp_path)
    with open(src, "r+b") as f:
        f.seek(30 * MiB + 5000)
        f.write(os.urandom(MiB))
    stats, _ = _push(src, dst)
    assert stats.bytes_sent <= MiB + 2 * BLOCK
    assert stats.bytes_sent > 0
    assert _same(src, dst)


def test_delta_overwrite_across_windows(big_pair: Path, tmp_path: Path) -> None:
    src, dst = _copy(big_pair, tmp_path)
    with open(src, "r+b") as f:
        f.seek(8 * MiB - 3000)
        f.write(os.urandom(10_000))
    stats, _ = _push(src, dst, window=8 * MiB, max_write=BLOCK)
    assert stats.bytes_sent == 2 * BLOCK
    assert stats.writes == 2
    assert _same(src, dst)


def test_delta_append(big_pair: Path, tmp_path: Path) -> None:
    src, dst = _copy(big_pair, tmp_path)
    with open(src, "ab") as f:
        f.write(os.urandom(3 * MiB + 7))
    stats, _ = _push(src, dst)
    assert stats.bytes_sent <= 3 * MiB + 7 + BLOCK
    assert _same(src, dst)


def test_delta_source_truncated(big_pair: Path, tmp_path: Path) -> None:
    src, dst = _copy(big_pair, tmp_path)
    os.truncate(src, 20 * MiB + 999)
    stats, _ = _push(src, dst)
    # Only the (now shorter) last block differs.
    assert stats.bytes_sent <= BLOCK
    assert _same(src, dst)


def test_delta_destination_shorter(big_pair: Path, tmp_path: Path) -> None:
    src, dst = _copy(big_pair, tmp_path)
    os.truncate(dst, 10 * MiB + 1)
    stats, _ = _push(src, dst)
    assert stats.bytes_sent <= 54 * MiB + BLOCK
    assert stats.bytes_matched >= 10 * MiB
    assert _same(src, dst)


def test_delta_destination_longer(big_pair: Path, tmp_path: Path) -> None:
    src, dst = _copy(big_pair, tmp_path)
    with open(dst, "ab") as f:
        f.write(os.urandom(5 * MiB))
    stats, _ = _push(src, dst)
    assert stats.bytes_sent == 0
    assert _same(src, dst)


def test_delta_stale_remote_size(big_pair: Path, tmp_path: Path) -> None:
    """The crawler's remote size is wrong (too small): the real secondary content is used."""
    src, dst = _copy(big_pair, tmp_path)
    stats = TransferStats()
    sfd = open_for_read(bytes(src))
    dfd = os.open(dst, os.O_RDWR)
    try:
        punch_hole(sfd_rw := os.open(src, os.O_RDWR), 40 * MiB, 4 * MiB)
        os.close(sfd_rw)
        push_file(LocalRpc(dfd), GFID, sfd, meta=_meta(sfd), remote_size=1, stats=stats)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert _same(src, dst)
    assert stats.bytes_sent == 0 and stats.holes_punched == 1


class _HashLog:
    """Wraps the real fsops.transfer.block_sigs to log which ranges the primary hashes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rpc: DeferredRpc | None = None
        self.ranges: list[tuple[int, int]] = []
        real = transfer.block_sigs

        def spy(fd: int, offset: int, length: int, block: int) -> bytes:
            self.ranges.append((offset, length))
            if self.rpc is not None:
                self.rpc.waits.append(("hash", offset, self.rpc.issued_sigs))
            return real(fd, offset, length, block)

        monkeypatch.setattr(transfer, "block_sigs", spy)


def test_delta_hashes_each_window_while_the_secondary_does(
    big_pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signatures of ``ahead`` bytes are requested first, and each window is hashed here
    before its reply is awaited, so both sides hash concurrently."""
    src, dst = _copy(big_pair, tmp_path)
    with open(src, "r+b") as f:
        f.seek(33 * MiB)
        f.write(os.urandom(MiB))
    hashes = _HashLog(monkeypatch)
    stats = TransferStats()
    sfd = open_for_read(bytes(src))
    dfd = os.open(dst, os.O_RDWR)
    try:
        rpc = DeferredRpc(dfd)
        hashes.rpc = rpc
        push_file(rpc, GFID, sfd, meta=_meta(sfd), remote_size=64 * MiB, stats=stats,
                  window=4 * MiB, ahead=16 * MiB)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert _same(src, dst)
    assert stats.bytes_sent == MiB and stats.bytes_matched == 63 * MiB
    windows = list(range(0, 64 * MiB, 4 * MiB))
    assert rpc.calls.count("data_sigs") == len(windows)
    events = [(what, off) for what, off, _n in rpc.waits]
    for k, off in enumerate(windows):
        hashed = events.index(("hash", off))
        waited = events.index(("data_sigs", off))
        assert hashed < waited
        # While window k is hashed, the secondary has windows k .. k+4 queued.
        assert rpc.waits[hashed][2] == min(len(windows), k + 5)
    # Each block hashed exactly once, all of it before its reply.
    assert hashes.ranges == [(off, 4 * MiB) for off in windows]


@pytest.mark.parametrize("hint", [1, 10 * MiB, 64 * MiB, 200 * MiB])
def test_delta_remote_size_hint_only_limits_hashing_ahead(
    big_pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hint: int
) -> None:
    """A stale ``remote_size`` (too small or too large) changes only when blocks are hashed,
    never the result; each block the secondary holds is hashed exactly once."""
    src, dst = _copy(big_pair, tmp_path)
    os.truncate(dst, 40 * MiB + 5)
    hashes = _HashLog(monkeypatch)
    stats, _ = _push(src, dst, deferred=True, remote_size=hint, window=8 * MiB)
    assert _same(src, dst)
    assert stats.bytes_matched == 40 * MiB
    assert stats.bytes_sent == 24 * MiB
    covered = sorted(r for r in hashes.ranges if r[1])
    pos = 0
    for off, length in covered:
        assert off == pos  # contiguous, no overlap
        pos += length
    # What was compared (40 MiB + 5 rounded up to a block) plus, for a hint too large,
    # the hinted blocks of the windows the secondary turned out not to cover.
    assert pos == max(40 * MiB + BLOCK, min(-(-hint // BLOCK) * BLOCK, 64 * MiB))


def test_delta_hole_punched_in_source(big_pair: Path, tmp_path: Path) -> None:
    src, dst = _copy(big_pair, tmp_path)
    fd = os.open(src, os.O_RDWR)
    try:
        punch_hole(fd, 16 * MiB, 2 * MiB)
        punch_hole(fd, 20 * MiB, BLOCK)
    finally:
        os.close(fd)
    before = dst.stat().st_blocks
    stats, _ = _push(src, dst)
    assert stats.holes_punched == 2
    assert stats.bytes_sent == 0
    assert _same(src, dst)
    assert dst.stat().st_blocks <= before - (2 * MiB + BLOCK) // 512
    assert dst.stat().st_blocks <= src.stat().st_blocks + 8


def test_file_changed_during_transfer(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _rand_file(src, 3 * MiB)
    old_mtime = 1_000_000_000_000_000_000
    os.utime(src, ns=(old_mtime, old_mtime))
    changed: list[int] = []

    def hook(method: str, args: dict) -> None:
        if method == "data_write" and not changed:
            with open(src, "ab") as f:
                f.write(b"more")
            changed.append(1)

    with pytest.raises(FileChanged):
        _push(src, dst, full=True, hook=hook)
    assert changed
    # data_finish was not sent: the secondary's mtime does not claim it is up to date
    assert dst.stat().st_mtime_ns != old_mtime
    # The re-queued transfer then converges.
    _, rpc = _push(src, dst)
    assert _same(src, dst)
    assert rpc.calls[-1] == "data_finish"


def test_file_changed_same_size(tmp_path: Path) -> None:
    """An in-place rewrite keeping the size is caught through mtime/ctime."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _rand_file(src, MiB)
    os.utime(src, ns=(10**18, 10**18))

    def hook(method: str, args: dict) -> None:
        if method == "data_write":
            with open(src, "r+b") as f:
                f.write(b"x")

    with pytest.raises(FileChanged):
        _push(src, dst, full=True, hook=hook)


def test_secondary_error_raised_and_no_finish(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _rand_file(src, 4 * MiB)
    os.utime(src, ns=(10**18, 10**18))

    def hook(method: str, args: dict) -> None:
        if method == "data_write" and args["offset"] == MiB:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        _push(src, dst, full=True, hook=hook, max_write=MiB)
    # The other writes were applied (all replies awaited), but no finish stamped the mtime.
    assert dst.stat().st_size == 4 * MiB
    assert dst.stat().st_mtime_ns != 10**18


def test_error_stops_before_finish(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _rand_file(src, 2 * MiB)
    calls: list[str] = []

    def hook(method: str, args: dict) -> None:
        calls.append(method)
        if method == "data_write":
            raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        _push(src, dst, full=True, hook=hook)
    assert "data_finish" not in calls


def _run_property(
    src_data: bytes,
    dst_data: bytes,
    holes: list[tuple[int, int]],
    *,
    block: int,
    window: int,
    max_write: int,
    full: bool,
    deferred: bool = False,
) -> TransferStats:
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "src", Path(d) / "dst"
        src.write_bytes(src_data)
        dst.write_bytes(b"" if full else dst_data)
        if holes:
            fd = os.open(src, os.O_RDWR)
            try:
                for off, ln in holes:
                    punch_hole(fd, off, ln)
            finally:
                os.close(fd)
        expect = src.read_bytes()
        stats, _ = _push(src, dst, full=full, block=block, window=window, max_write=max_write,
                         deferred=deferred)
        assert dst.read_bytes() == expect
        return stats


@settings(max_examples=150, deadline=None)
@given(
    src=st.binary(max_size=600),
    dst=st.binary(max_size=600),
    window=st.sampled_from([16, 48, 64, 1 << 20]),
    max_write=st.sampled_from([1, 16, 40, 1 << 20]),
    full=st.booleans(),
    deferred=st.booleans(),
)
def test_property_small(
    src: bytes, dst: bytes, window: int, max_write: int, full: bool, deferred: bool
) -> None:
    _run_property(src, dst, [], block=16, window=window, max_write=max_write, full=full,
                  deferred=deferred)


@settings(max_examples=40, deadline=None)
@given(
    src_blocks=st.lists(st.sampled_from([b"\0", b"a", b"b", b"r"]), max_size=24),
    dst_blocks=st.lists(st.sampled_from([b"\0", b"a", b"b", b"c"]), max_size=24),
    tail=st.integers(0, 4095),
    holes=st.lists(st.tuples(st.integers(0, 24), st.integers(1, 4)), max_size=3),
)
def test_property_sparse_4k(
    src_blocks: list[bytes], dst_blocks: list[bytes], tail: int, holes: list[tuple[int, int]]
) -> None:
    """Page-sized blocks so that punched holes are real holes that SEEK_HOLE reports."""
    p = 4096

    def build(bl: list[bytes]) -> bytes:
        return b"".join(os.urandom(p) if b == b"r" else b * p for b in bl)

    s = build(src_blocks)
    s += os.urandom(tail) if s else b""
    d = build(dst_blocks)
    stats = _run_property(
        s, d, [(o * p, n * p) for o, n in holes], block=p, window=3 * p, max_write=2 * p,
        full=False, deferred=True,
    )
    assert stats.files == 1


def test_delta_frees_a_tail_block_that_became_a_hole(tmp_path: Path) -> None:
    """Truncate down then extend on the primary frees the last, partial block; so must we."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(12_000)
    src.write_bytes(data)
    dst.write_bytes(data)
    os.truncate(src, 8192)  # frees the third 4 KiB block ...
    os.truncate(src, 9652)  # ... and extending leaves [8192, 9652) a hole
    _push(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks <= os.stat(src).st_blocks


@pytest.mark.parametrize("file_range", [False, True], ids=["pread", "splice"])
def test_a_cold_file_is_read_ahead_of_the_writes(tmp_path: Path, file_range: bool) -> None:
    """When the first data_write is submitted, the kernel has already been asked for the
    next READ_AHEAD bytes: they are in the page cache (or on their way into it)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 24 * MiB
    _rand_file(src, size)
    evict(src)
    if any(resident_pages(src)[256:]):  # e.g. tmpfs: nothing to evict, nothing to observe
        pytest.skip("the file system keeps this file cached")
    seen: list[list[bool]] = []

    def hook(method: str, args: dict) -> None:
        if method == "data_write" and args["offset"] == 0:
            # mincore counts a page once its read completed: give the disk a moment
            # (nothing else reads this file while we wait).
            deadline = time.monotonic() + 10
            while not all(ahead := resident_pages(src)[(16 * MiB) // 4096:]) and (
                    time.monotonic() < deadline):
                time.sleep(0.01)
            seen.append(ahead)

    # The transport reads a FileRange when it writes the frame; here that is at once.
    stats, _ = _push(src, dst, full=True, hook=hook,
                     file_range=(lambda fd, off, n: os.pread(fd, n, off)) if file_range else None)
    assert _same(src, dst) and stats.writes == size // transfer.MAX_WRITE
    # The first write's bytes were read by then, and the kernel's own readahead (at most
    # read_ahead_kb, 8 MiB here) may have added some after them; from 16 MiB on, only an
    # explicit request puts pages there this early.
    ahead = seen[0]
    assert all(ahead), f"{ahead.count(False)} of {len(ahead)} pages past 16 MiB not read ahead"
