"""Primary-side file data transfer: full copy or block-signature delta, over an RPC callable.

``push_file`` sends one regular file's content to the secondary with ``data_sigs``,
``data_write``, ``data_hole`` and ``data_finish`` (see docs/protocol.md). The secondary handles
requests in order, so writes are pipelined without waiting for each reply; only the number of
outstanding requests is bounded (memory) and every reply is checked before ``data_finish``,
which stamps the file's times and so must never follow a failed write.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsops.blocks import DEFAULT_BLOCK, SIG_SIZE, block_sigs, data_extents, zero_sig

#: ``rpc(method, args, payload)`` -> Future of the reply's result (exception on an error reply).
Rpc = Callable[[str, dict, Any], concurrent.futures.Future]
#: ``file_range(fd, offset, length)`` -> a payload standing for those bytes of the file,
#: which the rpc's transport reads itself (transport.FileRange: spliced into the pipe).
FileRangeOf = Callable[[int, int, int], Any]

#: Largest ``data_write`` payload.  4 MiB rather than 1: the secondary writes a large
#: payload with one ``O_DIRECT`` call that waits for the device, so fewer, larger writes
#: keep the disk busier per call (a 1 GiB file over ssh, three runs each on the benchmark
#: VM: streaming 1.81 -> 1.64 s, median).  The protocol allows 8 MiB (MAX_PAYLOAD).
MAX_WRITE = 4 << 20
#: Outstanding data_write/data_hole requests before waiting for the oldest reply (with
#: MAX_WRITE, at most 32 MiB of file data in flight per file).
MAX_OUTSTANDING = 8
#: How far ahead of what is being sent the kernel is asked to read a file (see _read_ahead).
READ_AHEAD = 32 << 20
_ADVISE_PIECE = 1 << 20
#: Upper bound of blocks per data_sigs request (keeps a reply <= 1 MiB of signatures).
MAX_SIGS_PER_REQUEST = 65536


@dataclass
class TransferStats:
    """Counters of one or more transfers (payload bytes, not frame overhead)."""

    bytes_sent: int = 0
    bytes_matched: int = 0
    holes_punched: int = 0
    writes: int = 0
    sig_bytes: int = 0
    files: int = 0


class FileChanged(Exception):
    """The primary file changed (size, mtime or ctime) while it was read: re-queue it.

    ``data_finish`` was not sent, so the secondary's times still mark the file as out of date.
    """


class _Sender:
    """Pipelined writes/holes for one file with a bound on outstanding requests."""

    def __init__(
        self, rpc: Rpc, gfid: bytes, fd: int, stats: TransferStats, max_write: int, timeout: float,
        file_range: FileRangeOf | None = None,
    ) -> None:
        self.rpc = rpc
        self.file_range = file_range
        self.gfid = gfid
        self.fd = fd
        self.stats = stats
        self.max_write = max_write
        self.timeout = timeout
        self.pending: deque[concurrent.futures.Future] = deque()
        #: The primary file's size: a hole reaching it is punched past it (see _punch).
        self.size = -1
        # Coalescing runs [start, end) of blocks still to write / to punch.
        self.w_start = self.w_end = 0
        self.h_start = self.h_end = 0
        #: End of what the kernel was asked to read ahead (see _read_ahead).
        self.advised = 0

    def _read_ahead(self, offset: int, end: int) -> None:
        """Keep the kernel reading up to READ_AHEAD bytes past ``offset`` (not past ``end``).

        A data write only reads its bytes when the transport writes the frame, one MiB
        at a time, and the kernel's own readahead does not keep a cold file ahead of
        that: sending a 1 GiB file that was not cached took ~1.5 s longer than a cached
        one over ssh on the benchmark VM, and as long as a cached one with this.
        ``POSIX_FADV_WILLNEED`` starts the reads and returns; asked again each MiB, the
        window slides.  A hint: errors are ignored.
        """
        stop = min(end, offset + READ_AHEAD)
        start = max(offset, self.advised)
        if stop - start < (1 << 20) and stop < end:
            return
        # In pieces: the kernel reads at most its readahead size (read_ahead_kb) per call.
        while start < stop:
            n = min(stop - start, _ADVISE_PIECE)
            try:
                os.posix_fadvise(self.fd, start, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                break
            start += n
        self.advised = stop

    def _submit(self, method: str, args: dict, payload: bytes | None) -> None:
        while len(self.pending) >= MAX_OUTSTANDING:
            self.pending.popleft().result(self.timeout)
        self.pending.append(self.rpc(method, args, payload))

    def send_range(self, offset: int, length: int) -> None:
        """Send ``[offset, offset+length)``: its data extents as data_writes of <= max_write
        bytes, and the holes between them as data_holes, so a changed block of a sparse
        file keeps its holes on the secondary (a hole never travels as zeros)."""
        end = offset + length
        for start, n in list(data_extents(self.fd, end, start=offset)):
            if start > offset:
                self._punch(offset, start - offset)
            self._send_data(start, start + n)
            offset = start + n
        if offset < end:
            self._punch(offset, end - offset)

    def _punch(self, offset: int, length: int) -> None:
        self._submit("data_hole", {"gfid": self.gfid, "offset": offset, "length": _past_eof(
            offset, length, self.size)}, None)
        self.stats.holes_punched += 1

    def _send_data(self, offset: int, end: int) -> None:
        if self.file_range is not None:
            # The transport reads the bytes itself, as it writes the frame (a file that
            # shrank meanwhile is padded, and caught by the FileChanged check).
            while offset < end:
                n = min(self.max_write, end - offset)
                self._read_ahead(offset, end)
                self._submit("data_write", {"gfid": self.gfid, "offset": offset},
                             self.file_range(self.fd, offset, n))
                self.stats.writes += 1
                self.stats.bytes_sent += n
                offset += n
            return
        while offset < end:
            self._read_ahead(offset, end)
            data = os.pread(self.fd, min(self.max_write, end - offset), offset)
            if not data:
                return  # the file shrank: caught by the FileChanged check
            self._submit("data_write", {"gfid": self.gfid, "offset": offset}, data)
            self.stats.writes += 1
            self.stats.bytes_sent += len(data)
            offset += len(data)

    def write_block(self, offset: int, length: int) -> None:
        """Queue one changed block, coalescing with the previous one; flush every max_write."""
        if self.w_end != offset:
            self.flush_write()
            self.w_start = offset
        self.w_end = offset + length
        if self.w_end - self.w_start >= self.max_write:
            n = (self.w_end - self.w_start) // self.max_write * self.max_write
            self.send_range(self.w_start, n)
            self.w_start += n

    def flush_write(self) -> None:
        if self.w_end > self.w_start:
            self.send_range(self.w_start, self.w_end - self.w_start)
        self.w_start = self.w_end = 0

    def hole_block(self, offset: int, length: int) -> None:
        """Queue one block to punch, coalescing adjacent ones into one data_hole."""
        if self.h_end != offset:
            self.flush_hole()
            self.h_start = offset
        self.h_end = offset + length

    def flush_hole(self) -> None:
        if self.h_end > self.h_start:
            args = {"gfid": self.gfid, "offset": self.h_start,
                    "length": _past_eof(self.h_start, self.h_end - self.h_start, self.size)}
            self._submit("data_hole", args, None)
            self.stats.holes_punched += 1
        self.h_start = self.h_end = 0

    def drain(self) -> None:
        """Wait for every outstanding reply; raise the first error."""
        first: BaseException | None = None
        while self.pending:
            fut = self.pending.popleft()
            try:
                fut.result(self.timeout)
            except BaseException as e:  # collected, re-raised below
                if first is None:
                    first = e
        if first is not None:
            raise first


#: How far past the end of file a tail hole is punched.
_TAIL = 1 << 20


def _past_eof(offset: int, length: int, size: int) -> int:
    """Length of a hole punch, extended past EOF when the hole reaches it.

    Punching only up to a size that is not block-aligned zeroes the last, partial block
    but keeps it allocated; punching past EOF (the secondary punches with KEEP_SIZE, and
    data_finish sets the size) frees it, as a truncate-then-extend freed it on the primary.
    """
    if size >= 0 and offset + length >= size:
        return length + _TAIL
    return length


def _in_hole(extents: list[tuple[int, int]], ei: int, start: int, end: int) -> tuple[bool, int]:
    """Whether ``[start, end)`` intersects no data extent; returns (answer, advanced index)."""
    while ei < len(extents) and extents[ei][1] <= start:
        ei += 1
    return (ei >= len(extents) or extents[ei][0] >= end), ei


def push_file(
    rpc: Rpc,
    gfid: bytes,
    fd: int,
    *,
    meta: dict,
    remote_size: int | None,
    stats: TransferStats,
    block: int = DEFAULT_BLOCK,
    window: int = 16 << 20,
    ahead: int = 64 << 20,
    max_write: int = MAX_WRITE,
    timeout: float = 300,
    file_range: FileRangeOf | None = None,
) -> None:
    """Make the secondary file ``gfid`` equal to the primary file open on ``fd``, then finish it.

    ``remote_size`` None or 0 (new or empty on the secondary): the data extents are sent as is,
    holes are skipped (``data_finish`` extends the file, so they stay holes). Otherwise the file
    is compared block by block in windows of ``window`` bytes, the secondary's signatures of
    up to ``ahead`` bytes being requested before this side hashes the same range, so both
    sides hash concurrently; only differing blocks are written, and blocks that are holes on
    the primary but hold data on the secondary are punched. A primary file modified meanwhile
    raises :class:`FileChanged` and ``data_finish`` (which stamps size, owner, mode and times)
    is not sent. Errors from the secondary are raised (the first one) after all replies are in.
    """
    if block <= 0 or max_write <= 0:
        raise ValueError("block and max_write must be positive")
    st0 = os.fstat(fd)
    size = st0.st_size
    sender = _Sender(rpc, gfid, fd, stats, max_write, timeout, file_range)
    sender.size = size
    if not remote_size:
        for off, length in data_extents(fd, size):
            sender.send_range(off, length)
    else:
        _delta(rpc, sender, gfid, fd, size, remote_size, stats, block, window, ahead, timeout)
    sender.flush_write()
    sender.flush_hole()
    # Every write must have succeeded before data_finish stamps the times; on an early error
    # (raised above) the requests still in flight are simply abandoned, not waited for.
    sender.drain()
    st1 = os.fstat(fd)
    if (st1.st_size, st1.st_mtime_ns, st1.st_ctime_ns) != (
        st0.st_size,
        st0.st_mtime_ns,
        st0.st_ctime_ns,
    ):
        raise FileChanged(f"file changed while being sent (size {st0.st_size} -> {st1.st_size})")
    rpc("data_finish", {"gfid": gfid, "size": size, "meta": meta}, None).result(timeout)
    stats.files += 1


def _delta(
    rpc: Rpc,
    sender: _Sender,
    gfid: bytes,
    fd: int,
    size: int,
    remote_size: int,
    stats: TransferStats,
    block: int,
    window: int,
    ahead: int,
    timeout: float,
) -> None:
    """Block-signature comparison of ``[0, size)`` against the secondary, window by window.

    Up to ``ahead`` bytes of ``data_sigs`` windows are requested before their replies are
    needed, and each window is hashed here *before* waiting for its reply, so both sides hash
    the same window at the same time (one core each) instead of taking turns. The local
    hashing is limited to what ``remote_size`` (the crawler's idea of the secondary's size)
    says can be compared; when the reply shows the secondary holds more, the rest of the
    window is hashed after it.
    """
    window = max(block, min(window, block * MAX_SIGS_PER_REQUEST) // block * block)
    depth = max(1, ahead // window)
    inflight: deque[tuple[int, concurrent.futures.Future]] = deque()
    next_off = 0

    def request() -> None:
        # Asked even past ``remote_size``: the crawler's idea of the secondary's size may be
        # stale, and a longer secondary must not keep old data where the primary has holes.
        nonlocal next_off
        while next_off < size and len(inflight) < depth:
            length = min(window, size - next_off)
            args = {"gfid": gfid, "offset": next_off, "length": length, "block": block}
            inflight.append((next_off, rpc("data_sigs", args, None)))
            next_off += length

    request()
    while inflight:
        off, fut = inflight.popleft()
        request()  # keep ``depth`` windows queued on the secondary while this one is hashed
        wend = min(off + window, size)
        # Hash locally what the secondary can have (whole blocks), while it hashes its copy.
        hinted = min(wend - off, max(0, -(-(remote_size - off) // block) * block))
        local_sigs = block_sigs(fd, off, hinted, block)
        reply = fut.result(timeout)
        remote_sigs = bytes(reply["sigs"])
        r_size = int(reply["size"])
        stats.sig_bytes += len(remote_sigs)
        n_remote = len(remote_sigs) // SIG_SIZE
        need = min(wend - off, n_remote * block)
        if need > hinted:  # the secondary is longer than we were told
            local_sigs += block_sigs(fd, off + hinted, need - hinted, block)
        extents = [(s, s + n) for s, n in data_extents(fd, wend, start=off)]
        ei = 0
        for i, b_off in enumerate(range(off, wend, block)):
            b_len = min(block, wend - b_off)
            hole, ei = _in_hole(extents, ei, b_off, b_off + b_len)
            rsig = remote_sigs[i * SIG_SIZE : (i + 1) * SIG_SIZE] if i < n_remote else None
            if hole:
                if rsig is None:
                    continue  # past the secondary's end: data_finish's truncate makes the hole
                if rsig == zero_sig(min(b_len, r_size - b_off)):
                    stats.bytes_matched += b_len
                else:
                    sender.hole_block(b_off, b_len)
                continue
            lsig = local_sigs[i * SIG_SIZE : (i + 1) * SIG_SIZE]
            if rsig is not None and lsig == rsig:
                stats.bytes_matched += b_len
            else:
                sender.write_block(b_off, b_len)
