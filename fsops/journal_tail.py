"""Follow a journal as it grows, cheaply: the live crawl polls it every few milliseconds.

:class:`fsops.journal.JournalReader` re-reads files from their start; a tail keeps its
file open and its offset, reads only what was appended, and moves to the next file when
the writer rolls over.  A frame cut short at the end is a write in progress: it is read
on the next poll.
"""

from __future__ import annotations

import os
import zlib

from fsops import journal
from fsops.journal import JournalCorrupt, Record


class JournalTail:
    """Records of a journal directory after a starting point, as they are appended."""

    def __init__(self, directory: str, *, after_seq: int | None = None,
                 since_ts: int | None = None) -> None:
        self.dir = directory
        self.after_seq = after_seq
        self.since_ts = since_ts
        self.last_seq = -1
        self._file: journal.JournalFile | None = None
        self._fd: int | None = None
        self._off = 0
        self._buf = b""
        #: True when the last read reached the end of the journal.
        self.caught_up = False

    def close(self) -> None:
        """Release the open file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _wanted(self, rec: Record) -> bool:
        if self.after_seq is not None and rec.seq <= self.after_seq:
            return False
        return not (self.since_ts is not None and rec.ts < self.since_ts)

    def _open_next(self) -> bool:
        files = journal.list_files(self.dir)
        if self._file is None:
            cands = files
            if self.after_seq is not None:
                older = [f for f in files if f.first_seq <= self.after_seq]
                cands = files[len(older) - 1:] if older else files
            elif self.since_ts is not None:
                older = [f for f in files if f.first_ts < self.since_ts]
                cands = files[len(older) - 1:] if older else files
        else:
            cands = [f for f in files if f.first_seq > self._file.first_seq]
        if not cands:
            return False
        self.close()
        self._file = cands[0]
        self._fd = os.open(self._file.path, os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(os.dup(self._fd), "rb") as f:
            journal.read_header(f)
            self._off = f.tell()
        self._buf = b""
        return True

    def read_new(self, limit: int = 10000) -> list[Record]:
        """Records appended since the last call (at most about ``limit``), oldest first."""
        out: list[Record] = []
        self.caught_up = False
        if self._fd is None and not self._open_next():
            self.caught_up = True
            return out
        while len(out) < limit:
            assert self._fd is not None and self._file is not None
            chunk = os.pread(self._fd, 1 << 20, self._off)
            if chunk:
                self._off += len(chunk)
                self._buf += chunk
                self._parse(out)
                continue
            # At the end of this file: the writer may have moved on to a new one.
            if not self._open_next():
                self.caught_up = True
                break
        return out

    def _parse(self, out: list[Record]) -> None:
        buf, pos, size = self._buf, 0, journal._FRAME.size
        while len(buf) - pos >= size:
            length, crc = journal._FRAME.unpack_from(buf, pos)
            if length == 0 or length > journal.MAX_RECORD:
                raise JournalCorrupt(f"{self._path()}: impossible record length")
            end = pos + size + length
            if end > len(buf):
                break
            body = buf[pos + size:end]
            if zlib.crc32(body) != crc:
                raise JournalCorrupt(f"{self._path()}: crc mismatch")
            rec = journal.decode(body)
            pos = end
            self.last_seq = rec.seq
            if self._wanted(rec):
                out.append(rec)
        self._buf = buf[pos:]

    def _path(self) -> str:
        return self._file.path if self._file else self.dir
