"""Block-level file primitives shared by the primary (sender) and the secondary (applier).

The primary reads files without disturbing them (``O_NOATIME``), finds their data extents so
holes are never read nor sent, and computes per-block signatures; the secondary answers
``data_sigs`` / ``data_write`` / ``data_hole`` / ``data_finish`` with the ``handle_*``
functions below, on a file descriptor its caller opened by gfid.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import threading
from collections.abc import Iterator

import xxhash

#: Default signature/transfer block: large enough that a 16-byte digest per block is cheap to
#: ship (0.012 % of the data) and hashing is dominated by memory bandwidth, small enough that a
#: small in-place change re-sends little.
DEFAULT_BLOCK = 128 * 1024
#: Bytes of one block signature: XXH3-128 (see :func:`block_sig`).
SIG_SIZE = 16

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

#: Bytes read per syscall while hashing (rounded down to whole blocks, at least one block).
_READ_CHUNK = 1 << 20
#: Bytes of zeros written per call by the punch_hole fallback.
_ZERO_CHUNK = 1 << 20

# The process's own C library (as fsops.resolve does): find_library("c") would run
# `ldconfig -p` in a subprocess at every start of georep-node, primary and secondary.
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64 if hasattr(_libc, "fallocate64") else _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int
_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
#: sync_file_range(2) flag: start writeback of the dirty pages in the range, do not wait.
SYNC_FILE_RANGE_WRITE = 2
#: Writes at least this large start their writeback at once (see handle_write).
EARLY_WRITEBACK = 1 << 20
#: Writes at least this large go around the page cache (``O_DIRECT``, see handle_write).
DIRECT_MIN = 1 << 20
#: Alignment of direct writes (offset, length and buffer): the page size, a multiple of
#: every logical block size Linux supports for ``O_DIRECT`` on local disks.
DIRECT_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)

_tls = threading.local()

_NOATIME = getattr(os, "O_NOATIME", 0)


def open_for_read(path: bytes, *, dir_fd: int | None = None) -> int:
    """Open ``path`` read-only without following a final symlink and without updating atime.

    ``O_NOATIME`` keeps the primary's access times untouched by replication reads (they are
    replicated themselves). It is only allowed to the file's owner or a privileged process, so
    on ``EPERM`` the open is retried without it.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    if _NOATIME:
        try:
            return os.open(path, flags | _NOATIME, dir_fd=dir_fd)
        except PermissionError:
            pass
    return os.open(path, flags, dir_fd=dir_fd)


def data_extents(fd: int, size: int, *, start: int = 0) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, length)`` of the data ranges of ``fd`` within ``[start, size)``.

    Uses ``SEEK_DATA``/``SEEK_HOLE`` so holes of sparse files are neither read nor sent. A file
    system without support (``EINVAL``/``ENOTSUP``) is treated as one data extent. Extents are
    clipped to ``size`` (the size sampled by the caller), so a file growing meanwhile does not
    make the caller read past what it decided to transfer. Uses ``lseek`` on ``fd``, so the
    file position is changed; all readers here use ``pread``.
    """
    off = start
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                yield off, size - off
                return
            raise
        if data >= size:
            return
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            hole = size
        hole = min(hole, size)
        if hole <= data:  # the file shrank between the two seeks
            return
        yield data, hole - data
        off = hole


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of ``fd`` keeping its size, so it reads as zeros.

    Keeps the secondary as sparse as the primary. Where the file system cannot punch holes
    (``EOPNOTSUPP``) zeros are written instead: the content is still right, only not sparse.
    """
    if length <= 0:
        return
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, mode, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")
    zeros = bytes(min(length, _ZERO_CHUNK))
    end = offset + length
    pos = offset
    while pos < end:
        n = min(len(zeros), end - pos)
        pos += handle_write(fd, pos, memoryview(zeros)[:n])


def block_sig(data: bytes | bytearray | memoryview) -> bytes:
    """The signature of one block: its XXH3-128 digest (16 bytes, canonical big-endian form).

    XXH3 rather than a hashlib hash because both sides hash every block of a changed file,
    so the hash is most of the CPU a big-file delta costs: on the machine of BENCHMARKS.md,
    hashing 1 GiB (128 KiB blocks, data in the page cache) takes under 0.1 s of CPU with
    XXH3-128, ~0.7 s with SHA-256 (the fastest in hashlib, on SHA-NI) and ~1.6 s with
    protocol 1's blake2b-128, plus ~0.17 s of ``pread`` copies in every case. rsync (>= 3.2)
    uses xxh128 for the same job.
    128 bits keep an accidental match of two different blocks out of reach (~2^-128 per
    block compared). It is not a cryptographic hash: a deliberate collision needs someone
    who writes both the secondary's old block and the primary's new one at the same offset
    of the same file, i.e. who can write that file anyway; a hostile secondary can lie about
    any hash. See docs/protocol.md.
    """
    return xxhash.xxh3_128_digest(data)


@functools.lru_cache(maxsize=64)
def zero_sig(n: int) -> bytes:
    """Signature of ``n`` zero bytes (cached): what a block lying in a hole hashes to."""
    return block_sig(bytes(n))


def _read_buffer(size: int) -> memoryview:
    """A per-thread reusable buffer of at least ``size`` bytes (avoids one allocation per read)."""
    buf: bytearray | None = getattr(_tls, "buf", None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        _tls.buf = buf
    return memoryview(buf)[:size]


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` looping over short reads; return bytes read (short at EOF)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def block_sigs(fd: int, offset: int, length: int, block: int) -> bytes:
    """Concatenated :func:`block_sig` of each ``block`` of ``[offset, offset+length)``.

    The last block may be short; the range is also cut at end of file, so a shorter file yields
    fewer (or a short last) signature. Blocks lying entirely in a hole get ``zero_sig`` without
    being read or hashed, which keeps sparse files cheap on both sides. Data is read in chunks of
    about 1 MiB into a reused per-thread buffer.
    """
    if length <= 0:
        return b""
    if block <= 0:
        raise ValueError("block must be positive")
    end = min(offset + length, os.fstat(fd).st_size)
    extents = [(s, s + n) for s, n in data_extents(fd, end, start=offset)]
    chunk = max(block, _READ_CHUNK // block * block)
    buf = _read_buffer(chunk)
    out: list[bytes] = []
    xxh3_128 = xxhash.xxh3_128_digest
    ei = 0
    pos = offset
    while pos < end:
        while ei < len(extents) and extents[ei][1] <= pos:
            ei += 1
        hole_end = min(extents[ei][0], end) if ei < len(extents) else end
        if hole_end - pos >= block or hole_end == end:
            # [pos, hole_end) is a hole: its whole blocks (and a short last block) hash to zeros.
            n = (hole_end - pos) // block
            if n:
                out.append(zero_sig(block) * n)
                pos += n * block
            if hole_end == end and pos < end:
                out.append(zero_sig(end - pos))
                pos = end
            continue
        # Data from here: read whole blocks up to the chunk size or the end of this extent.
        ext_end = extents[ei][1]
        want = min(chunk, -(-(ext_end - pos) // block) * block, end - pos)
        view = buf[:want]
        got = _pread_into(fd, view, pos)
        for i in range(0, got, block):
            out.append(xxh3_128(view[i : min(i + block, got)]))
        if got < want:
            break  # the file shrank meanwhile
        pos += got
    return b"".join(out)


def syncfs(fd: int) -> None:
    """Flush the whole file system holding ``fd`` to stable storage (the ``commit`` barrier)."""
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


# --- secondary-side handlers ---------------------------------------------------------------


def handle_sigs(fd: int, offset: int, length: int, block: int) -> dict[str, object]:
    """Answer ``data_sigs``: signatures of ``[offset, offset+length)`` clipped to the file size.

    Returns ``{"size", "mtime", "sigs"}`` so the primary also learns the secondary's current
    size (it may differ from what the crawler believed).
    """
    st = os.fstat(fd)
    length = max(0, min(length, st.st_size - offset))
    return {
        "size": st.st_size,
        "mtime": st.st_mtime_ns,
        "sigs": block_sigs(fd, offset, length, block),
    }


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


class DirectWriter:
    """Large writes with ``O_DIRECT``: the data goes from an aligned buffer to the disk.

    Why: a buffered write copies every byte into freshly allocated page-cache pages.  On
    the machines of BENCHMARKS.md that copy is most of the secondary's CPU for big files
    (1 GiB: ~1.7-3.3 s of system time buffered against ~0.2 s direct, ``dd``), CPU that
    ssh and sshd need on the same cores, and the pages are written back before the commit
    anyway.  Nothing reads a replica's new data soon, so caching it buys nothing.

    Only the aligned middle of a write goes direct; its unaligned head and tail, and every
    write on a file system that refuses ``O_DIRECT`` (``EINVAL`` from ``fcntl`` or
    ``pwrite``: remembered per device), are written buffered.  The descriptor gets
    ``O_DIRECT`` only for the call, so the rest of the secondary's I/O on it is unchanged.
    Durability is unchanged too: the ``commit`` (syncfs) still flushes the device's cache
    and the metadata.  ``GEOREP_DIRECT_WRITES=0`` in the secondary's environment turns
    this off.  One instance per thread (its buffer is reused).
    """

    def __init__(self, buffer_size: int = 8 << 20) -> None:
        self._buf = mmap.mmap(-1, buffer_size)  # anonymous: page-aligned, reused
        self._view = memoryview(self._buf)
        self.refused: set[int] = set()  # st_dev of file systems without O_DIRECT
        self.enabled = bool(_O_DIRECT) and os.environ.get("GEOREP_DIRECT_WRITES", "1") != "0"
        self.direct_bytes = 0

    def write(self, fd: int, offset: int, view: memoryview) -> int:
        """Write all of ``view`` at ``offset``; returns its length."""
        end = offset + len(view)
        start = -(-offset // DIRECT_ALIGN) * DIRECT_ALIGN
        stop = end // DIRECT_ALIGN * DIRECT_ALIGN
        if not self.enabled or stop - start < DIRECT_MIN:
            return _pwrite_all(fd, view, offset)
        dev = os.fstat(fd).st_dev
        if dev in self.refused:
            return _pwrite_all(fd, view, offset)
        _pwrite_all(fd, view[: start - offset], offset)
        middle = view[start - offset: stop - offset]
        if not self._direct(fd, dev, middle, start):
            _pwrite_all(fd, middle, start)
        _pwrite_all(fd, view[stop - offset:], stop)
        return len(view)

    def _direct(self, fd: int, dev: int, view: memoryview, offset: int) -> bool:
        """Write ``view`` at ``offset`` (both aligned) with O_DIRECT; False when the file
        system refuses it before anything was written (the caller writes it buffered).

        Whatever is left when a direct write stops short (a short write off alignment, or
        EINVAL part-way: an alignment stricter than DIRECT_ALIGN) is written buffered.
        """
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.refused.add(dev)
            return False
        written = 0  # bytes of view on disk so far
        try:
            size = len(self._buf)
            while written < len(view):
                n = min(size, len(view) - written)
                self._view[:n] = view[written: written + n]
                done = 0
                while done < n:
                    try:
                        w = os.pwrite(fd, self._view[done:n], offset + written + done)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        self.refused.add(dev)  # stricter alignment than DIRECT_ALIGN
                        w = -1
                    if w < 0 or w % DIRECT_ALIGN:
                        written += done + max(w, 0)
                        if not written:
                            return False
                        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
                        _pwrite_all(fd, view[written:], offset + written)
                        self.direct_bytes += written
                        return True
                    done += w
                written += n
            self.direct_bytes += written
            return True
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _direct_writer() -> DirectWriter:
    w: DirectWriter | None = getattr(_tls, "direct", None)
    if w is None:
        w = _tls.direct = DirectWriter()
    return w


def handle_write(fd: int, offset: int, payload: bytes | bytearray | memoryview) -> int:
    """Answer ``data_write``: write all of ``payload`` at ``offset`` (looping on short writes).

    Large writes go around the page cache (:class:`DirectWriter`); the rest of a large
    buffered write starts its writeback at once.
    """
    view = memoryview(payload)
    if len(view) >= DIRECT_MIN:
        return _direct_writer().write(fd, offset, view)
    done = _pwrite_all(fd, view, offset)
    if done >= EARLY_WRITEBACK:
        # Large data: start its writeback now rather than leave it all to the ``commit``
        # (syncfs) that must finish before the marks move; a hint, errors ignored.
        _sync_file_range(fd, offset, done, SYNC_FILE_RANGE_WRITE)
    return done


def handle_hole(fd: int, offset: int, length: int) -> None:
    """Answer ``data_hole``: punch ``[offset, offset+length)`` keeping the file size."""
    punch_hole(fd, offset, length)


def handle_truncate(fd: int, size: int) -> None:
    """Set the file size (the data part of ``data_finish``); growing leaves a hole."""
    if os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)
