"""The change journal: durable, versioned record files in the session state dir.

A journal is a directory of files ``journal.<first_seq:016x>.<first_ts>``.  Each file
starts with a header (magic ``GRJ1``, format version, brick root, creation time, first
seq/ts, whether the recorder was running when the file was opened) and holds framed
records: ``u32 length | u32 crc32 | msgpack body``.  One writer appends; any number of
readers stream.  The on-disk format, the fsync policy and the coverage rules are
documented in docs/journal.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import IO

import msgpack

log = logging.getLogger(__name__)

MAGIC = b"GRJ1"
VERSION = 1
PREFIX = "journal."
LOCK_NAME = "journal.lock"

#: Record kinds.
ENTRY, RENAME, DATA, META = "E", "R", "D", "M"
START, STOP, OVERFLOW = "START", "STOP", "OVERFLOW"
MARKERS = frozenset({START, STOP, OVERFLOW})
KINDS = frozenset({ENTRY, RENAME, DATA, META}) | MARKERS

_HEAD = struct.Struct(">4sHHI")  # magic, version, header body length, header crc32
_FRAME = struct.Struct(">II")  # record body length, crc32 of the body
#: A record is a few hundred bytes at most (names <= 255 bytes); anything longer is damage.
MAX_RECORD = 1 << 16
_CHUNK = 1 << 20
_SYNC_INTERVAL = 0.1


class JournalError(Exception):
    """The journal cannot be used (locked by another writer, unknown format version)."""


class JournalCorrupt(JournalError):
    """A sealed journal file holds a damaged record (crc mismatch, impossible length)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One journal record.  For ``R``, ``pgfid``/``name`` are the old parent and name."""

    kind: str
    ts: int = 0
    seq: int = 0
    gfid: bytes | None = None
    pgfid: bytes | None = None
    name: bytes | None = None
    npgfid: bytes | None = None
    nname: bytes | None = None
    #: ``D``/``M`` of a file with several links: its file handle, so the worker can find
    #: the object's current name when the one recorded is gone (the change is not lost).
    handle: bytes | None = None

    @classmethod
    def entry(cls, ts: int, pgfid: bytes, name: bytes) -> Record:
        """``E``: re-check ``name`` in directory ``pgfid``."""
        return cls(ENTRY, ts, pgfid=pgfid, name=name)

    @classmethod
    def rename(cls, ts: int, opgfid: bytes, oname: bytes, npgfid: bytes, nname: bytes,
               gfid: bytes | None) -> Record:
        """``R``: ``opgfid/oname`` was renamed to ``npgfid/nname`` (object ``gfid`` if known)."""
        return cls(RENAME, ts, gfid=gfid, pgfid=opgfid, name=oname, npgfid=npgfid, nname=nname)

    @classmethod
    def data(cls, ts: int, gfid: bytes, pgfid: bytes | None = None,
             name: bytes | None = None, handle: bytes | None = None) -> Record:
        """``D``: the content of ``gfid`` (``name`` in directory ``pgfid``) changed."""
        return cls(DATA, ts, gfid=gfid, pgfid=pgfid, name=name, handle=handle)

    @classmethod
    def meta(cls, ts: int, gfid: bytes, pgfid: bytes | None = None,
             name: bytes | None = None, handle: bytes | None = None) -> Record:
        """``M``: attributes or xattrs of ``gfid`` (``name`` in ``pgfid``) changed.

        The parent and name are absent for an event on a directory itself.
        """
        return cls(META, ts, gfid=gfid, pgfid=pgfid, name=name, handle=handle)

    @classmethod
    def marker(cls, kind: str, ts: int) -> Record:
        """``START``, ``STOP`` or ``OVERFLOW``."""
        if kind not in MARKERS:
            raise ValueError(f"not a marker: {kind!r}")
        return cls(kind, ts)

    @property
    def opgfid(self) -> bytes | None:
        """Old parent of a rename (alias of ``pgfid``)."""
        return self.pgfid

    @property
    def oname(self) -> bytes | None:
        """Old name of a rename (alias of ``name``)."""
        return self.name

    def key(self) -> tuple[object, ...]:
        """Identity of the change without its position (for dedup)."""
        return (self.kind, self.gfid, self.pgfid, self.name, self.npgfid, self.nname)


# -- encoding ---------------------------------------------------------------------------

def encode(rec: Record) -> bytes:
    """The msgpack body of a record (short keys, names and gfids as bin)."""
    d: dict[str, object] = {"k": rec.kind, "s": rec.seq, "t": rec.ts}
    if rec.kind == RENAME:
        d["op"], d["on"], d["np"], d["nn"] = rec.pgfid, rec.name, rec.npgfid, rec.nname
        if rec.gfid is not None:
            d["g"] = rec.gfid
    else:
        if rec.gfid is not None:
            d["g"] = rec.gfid
        if rec.pgfid is not None:
            d["p"] = rec.pgfid
        if rec.name is not None:
            d["n"] = rec.name
        if rec.handle is not None:
            d["h"] = rec.handle
    return msgpack.packb(d, use_bin_type=True)


def decode(body: bytes) -> Record:
    """Inverse of :func:`encode`."""
    d = msgpack.unpackb(body, raw=False, max_bin_len=MAX_RECORD, max_str_len=64,
                        max_map_len=16, max_array_len=0)
    if d.get("k") == RENAME:
        return Record(RENAME, d["t"], d["s"], d.get("g"), d["op"], d["on"], d["np"], d["nn"])
    return Record(d["k"], d["t"], d["s"], d.get("g"), d.get("p"), d.get("n"), handle=d.get("h"))


def _frame(rec: Record) -> bytes:
    body = encode(rec)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


# -- files ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JournalFile:
    """One journal file as its name describes it."""

    path: str
    first_seq: int
    first_ts: int


def file_name(first_seq: int, first_ts: int) -> str:
    """``journal.<first_seq:016x>.<first_ts>``."""
    return f"{PREFIX}{first_seq:016x}.{first_ts}"


def list_files(directory: str) -> list[JournalFile]:
    """The journal files of ``directory``, oldest first (by first seq)."""
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for n in names:
        parts = n.split(".")
        if len(parts) != 3 or parts[0] + "." != PREFIX:
            continue
        try:
            out.append(JournalFile(os.path.join(directory, n), int(parts[1], 16), int(parts[2])))
        except ValueError:
            continue
    out.sort(key=lambda f: f.first_seq)
    return out


def read_header(f: IO[bytes]) -> dict[str, object]:
    """Read and check a file header; the file position ends at the first record."""
    raw = f.read(_HEAD.size)
    if len(raw) < _HEAD.size:
        raise JournalCorrupt("short header")
    magic, version, hlen, hcrc = _HEAD.unpack(raw)
    if magic != MAGIC:
        raise JournalCorrupt(f"bad magic {magic!r}")
    if version > VERSION:
        raise JournalError(f"journal format version {version} is newer than {VERSION}")
    body = f.read(hlen)
    if len(body) < hlen or zlib.crc32(body) != hcrc:
        raise JournalCorrupt("damaged header")
    hdr = msgpack.unpackb(body, raw=False)
    if not isinstance(hdr, dict):
        raise JournalCorrupt("header is not a map")
    return hdr


def _header_bytes(root: bytes, first_seq: int, first_ts: int, running: bool) -> bytes:
    body = msgpack.packb({"root": root, "created": time.time_ns(), "seq": first_seq,
                          "ts": first_ts, "run": running}, use_bin_type=True)
    return _HEAD.pack(MAGIC, VERSION, len(body), zlib.crc32(body)) + body


def scan_file(path: str, *, strict: bool) -> Iterator[tuple[int, Record]]:
    """Yield ``(end offset, record)`` for each valid record of one file, streaming.

    A frame cut short at the end of the file (a write in progress, or a crash) ends the
    scan quietly.  A damaged frame raises :class:`JournalCorrupt` when ``strict``; else
    the scan ends there too (the writer's recovery uses that to find the truncation point).
    """
    with open(path, "rb") as f:
        read_header(f)
        pos = f.tell()
        buf = bytearray()
        off = 0
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return  # what is left in buf is a frame cut short
            del buf[:off]
            off = 0
            buf += chunk
            while len(buf) - off >= _FRAME.size:
                length, crc = _FRAME.unpack_from(buf, off)
                if length == 0 or length > MAX_RECORD:
                    if strict:
                        raise JournalCorrupt(f"{path}: impossible record length at {pos}")
                    return
                end = off + _FRAME.size + length
                if end > len(buf):
                    break
                body = bytes(buf[off + _FRAME.size:end])
                if zlib.crc32(body) != crc:
                    if strict:
                        raise JournalCorrupt(f"{path}: crc mismatch at offset {pos}")
                    return
                try:
                    rec = decode(body)
                except Exception as e:
                    if strict:
                        raise JournalCorrupt(f"{path}: undecodable record at {pos}: {e}")
                    return
                pos += end - off
                off = end
                yield pos, rec


# -- writer -----------------------------------------------------------------------------

class JournalWriter:
    """Appends records to the journal in ``directory``; the only writer (flock-ed).

    ``fsync``: ``"batch"`` (group commit: appended records are fsynced within 100 ms, by
    a background thread, and at once by :meth:`flush`), ``"always"`` (fsync in every
    :meth:`append`) or ``"none"`` (only on :meth:`flush`, roll-over and :meth:`close`).
    """

    def __init__(self, directory: str | bytes, *, root: bytes = b"",
                 roll_bytes: int = 64 << 20, roll_seconds: float = 60,
                 fsync: str = "batch") -> None:
        if fsync not in ("batch", "always", "none"):
            raise ValueError(f"fsync policy must be batch, always or none, not {fsync!r}")
        self.dir = os.fsdecode(directory)
        self.root = root
        self.roll_bytes = roll_bytes
        self.roll_seconds = roll_seconds
        self.fsync = fsync
        os.makedirs(self.dir, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.dir, LOCK_NAME),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise JournalError(f"journal {self.dir!r} is in use by another writer")
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._opened = 0.0
        self._dirty = False
        self._last_sync = 0.0
        self._running = False
        self._closed = False
        self.last_seq, self.last_ts = self._recover()
        self._cond = threading.Condition(self._lock)
        self._syncer: threading.Thread | None = None
        if fsync == "batch":
            self._syncer = threading.Thread(target=self._sync_loop, name="journal-fsync",
                                            daemon=True)
            self._syncer.start()

    def _recover(self) -> tuple[int, int]:
        """Truncate a torn tail of the newest file; return the last (seq, ts) written."""
        files = list_files(self.dir)
        while files:
            jf = files[-1]
            try:
                last: Record | None = None
                good = 0
                for good, rec in scan_file(jf.path, strict=False):  # noqa: B007
                    last = rec
            except JournalCorrupt:
                log.warning("journal file %s has a damaged header: removed", jf.path)
                os.unlink(jf.path)
                files.pop()
                continue
            if last is None:
                os.unlink(jf.path)  # no record survived: its name would lie about first seq
                files.pop()
                continue
            size = os.path.getsize(jf.path)
            if size > good:
                log.warning("journal file %s: torn tail of %d bytes truncated",
                            jf.path, size - good)
                with open(jf.path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
            return last.seq, last.ts
        return 0, 0

    def append(self, records: Iterable[Record]) -> list[Record]:
        """Write records (seq assigned, ts made non-decreasing); returns them as written."""
        out: list[Record] = []
        with self._lock:
            if self._closed:
                raise JournalError("journal writer is closed")
            if self._fd >= 0 and (self._size >= self.roll_bytes
                                  or time.monotonic() - self._opened >= self.roll_seconds):
                self._seal()
            chunks = []
            running_before = self._running
            seq, ts = self.last_seq, self.last_ts
            for r in records:
                seq += 1
                ts = max(ts, r.ts)
                r = replace(r, seq=seq, ts=ts)
                out.append(r)
                chunks.append(_frame(r))
                if r.kind == START or r.kind == OVERFLOW:
                    self._running = True
                elif r.kind == STOP:
                    self._running = False
            if not out:
                return out
            if self._fd < 0:
                self._create(out[0].seq, out[0].ts, running_before=running_before)
            data = b"".join(chunks)
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self._size += len(data)
            self.last_seq, self.last_ts = seq, ts
            self._dirty = True
            if self.fsync == "always":
                self._sync_locked()
            elif self.fsync == "batch":
                self._cond.notify()
        return out

    def _create(self, first_seq: int, first_ts: int, *, running_before: bool) -> None:
        path = os.path.join(self.dir, file_name(first_seq, first_ts))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        hdr = _header_bytes(self.root, first_seq, first_ts, running_before)
        os.write(fd, hdr)
        os.fsync(fd)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._fd, self._size, self._opened = fd, len(hdr), time.monotonic()

    def _seal(self) -> None:
        self._sync_locked()
        os.close(self._fd)
        self._fd = -1

    def _sync_locked(self) -> None:
        if self._fd >= 0 and self._dirty:
            os.fsync(self._fd)
        self._dirty = False
        self._last_sync = time.monotonic()

    def _sync_loop(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._dirty:
                    self._cond.wait()
                    continue
                wait = self._last_sync + _SYNC_INTERVAL - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                # fsync a dup outside the lock so appends never wait for the disk.
                fd = os.dup(self._fd) if self._fd >= 0 else -1
                self._dirty = False
                self._last_sync = time.monotonic()
                self._cond.release()
                try:
                    if fd >= 0:
                        os.fsync(fd)
                        os.close(fd)
                finally:
                    self._cond.acquire()

    def flush(self) -> None:
        """Make everything appended so far durable (fsync now)."""
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
            self._dirty = False
            self._last_sync = time.monotonic()

    @property
    def running(self) -> bool:
        """True between a START and a STOP written by this writer."""
        return self._running

    def close(self) -> None:
        """Write STOP (if a START is open), fsync, release the journal."""
        if self._closed:
            return
        if self._running:
            self.append([Record.marker(STOP, time.time_ns())])
        with self._lock:
            if self._fd >= 0:
                self._seal()
            self._closed = True
            self._cond.notify_all()
        if self._syncer is not None:
            self._syncer.join()
        os.close(self._lock_fd)

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reader -----------------------------------------------------------------------------

class JournalReader:
    """Streams records of the journal in ``directory``; safe beside a live writer."""

    def __init__(self, directory: str | bytes) -> None:
        self.dir = os.fsdecode(directory)

    def files(self) -> list[JournalFile]:
        """Journal files, oldest first."""
        return list_files(self.dir)

    def _start_index(self, files: list[JournalFile], ts: int | None, seq: int | None) -> int:
        idx = 0
        for i, jf in enumerate(files):
            if seq is not None and jf.first_seq <= seq:
                idx = i
            # strict: records with ts equal to a file's first ts may end the file before.
            if ts is not None and jf.first_ts < ts:
                idx = i
        return idx

    def records_since(self, ts: int | None = None, *, seq: int | None = None
                      ) -> Iterator[Record]:
        """Records with ``ts >= ts`` (or ``seq >= seq``), oldest first, streamed.

        Reads to the end of the journal as it is when the generator gets there (files
        created meanwhile are followed).  Raises :class:`JournalCorrupt` on a damaged record.
        """
        if (ts is None) == (seq is None):
            raise ValueError("give exactly one of ts and seq")
        files = self.files()
        if not files:
            return
        i = self._start_index(files, ts, seq)
        last_seen = -1
        while True:
            jf = files[i]
            for _, rec in scan_file(jf.path, strict=True):
                last_seen = rec.seq
                if (ts is not None and rec.ts < ts) or (seq is not None and rec.seq < seq):
                    continue
                yield rec
            i += 1
            if i >= len(files):
                files = [f for f in self.files() if f.first_seq > last_seen]
                if not files:
                    return
                i = 0

    def coverage(self, since_ts: int) -> bool:
        """True when the journal records every change from ``since_ts`` until now.

        That is: a START at or before ``since_ts``, and after it no STOP, no new START
        (a restart: the recorder was down in between), no OVERFLOW at or after
        ``since_ts``, and no missing seq.  A gap entirely before ``since_ts`` is fine.
        Call it while the recorder runs: a crashed recorder leaves no STOP, its restart
        writes the START that reveals the gap.
        """
        files = self.files()
        start = None
        for i, jf in enumerate(files):
            if jf.first_ts <= since_ts:
                start = i
        if start is None:
            return False
        try:
            with open(files[start].path, "rb") as f:
                running = bool(read_header(f).get("run"))
        except (OSError, JournalCorrupt):
            return False
        expect = files[start].first_seq
        for jf in files[start:]:
            if jf.first_seq != expect:
                if jf.first_ts >= since_ts:
                    return False
                running = False
                expect = jf.first_seq
            try:
                for _, r in scan_file(jf.path, strict=True):
                    if r.seq != expect:
                        if r.ts >= since_ts:
                            return False
                        running = False
                    expect = r.seq + 1
                    if r.kind == START:
                        if r.ts > since_ts:
                            return False
                        running = True
                    elif r.kind == STOP:
                        if r.ts >= since_ts:
                            return False
                        running = False
                    elif r.kind == OVERFLOW and r.ts >= since_ts:
                        return False
            except JournalCorrupt:
                return False
        return running

    def prune(self, before_ts: int, keep_seconds: float = 0) -> list[str]:
        """Delete the oldest files whose records are all older than the mark minus the window.

        Only a prefix of the journal is removed, never the newest file.  Returns the paths.
        """
        cutoff = before_ts - int(keep_seconds * 1_000_000_000)
        files = self.files()
        removed = []
        for jf, nxt in itertools.pairwise(files):
            # records are ts-ordered: every record of jf is <= the next file's first ts
            if nxt.first_ts >= cutoff:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(jf.path)
            removed.append(jf.path)
        return removed


def prune(directory: str | bytes, before_ts: int, keep_seconds: float = 0) -> list[str]:
    """Module-level shorthand for :meth:`JournalReader.prune`."""
    return JournalReader(directory).prune(before_ts, keep_seconds)
