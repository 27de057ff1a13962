"""The secondary-side actor host: ``georep-node secondary --root PATH``.

Reads requests from stdin and hands them to two actors:

- EntryApplier: the only writer.  Entry, meta and data requests, ``end_crawl`` and
  ``commit`` are applied strictly in the order they arrive, so the primary may
  pipeline (a file's ``ensure`` always lands before its data).
- Lister: read-only questions (``list_dir``, ``lookup``, ``stat_gfid``, ``ping``),
  answered at once instead of behind queued writes.  Safe because the primary's ops
  re-check gfids when applied, and a gfid's index entry, once made, stays until
  ``end_crawl``.

stdout carries frames only; everything else goes to stderr, which the primary relays
as ``remote:`` log lines.  A bounded number of requests may be queued in the actors.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections import OrderedDict
from typing import Any

import pykka

from fsops import blocks
from fsops.secondary import NotFound as FsNotFound
from fsops.secondary import SecondaryError as FsError
from fsops.secondary import SecondaryFS
from transport import (
    PROTOCOL,
    VERSION,
    HandshakeError,
    NotFound,
    ProtocolError,
    Request,
    SecondaryError,
    ServerConnection,
    claim_stdio,
)

log = logging.getLogger("georep.secondary")

#: Requests read but not yet answered; past this the reader waits (explicit backpressure).
MAX_QUEUED = 128
#: Files kept open between data requests.
MAX_OPEN_DATA = 32

_READ_ONLY = frozenset({"list_dir", "lookup", "stat_gfid", "ping"})


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, FsNotFound):
        return NotFound(str(exc))
    if isinstance(exc, FsError):
        return SecondaryError(str(exc))
    return exc


class _Worker(pykka.ThreadingActor):
    """Common part: run a request, send its reply from this actor's thread."""

    def __init__(self, conn: ServerConnection, slots: threading.Semaphore) -> None:
        super().__init__()
        self.conn = conn
        self.slots = slots
        self.handled = 0

    def handle(self, req: Request) -> None:
        """Run one request and reply; a failure is a reply, never the actor's death."""
        try:
            result = getattr(self, "do_" + req.method)(req.args, req.payload)
        except Exception as exc:
            if not isinstance(exc, OSError | FsError):
                log.exception("%s failed", req.method)
            self.conn.send_reply(req.id, error=_translate(exc))
        else:
            self.conn.send_reply(req.id, result)
        finally:
            self.handled += 1
            self.slots.release()


class EntryApplier(_Worker):
    """Applies entry, meta and data requests in arrival order."""

    def __init__(self, conn: ServerConnection, slots: threading.Semaphore,
                 fs: SecondaryFS) -> None:
        super().__init__(conn, slots)
        self.fs = fs
        self._open: OrderedDict[bytes, int] = OrderedDict()

    def on_stop(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def _fd(self, gfid: bytes) -> int:
        fd = self._open.get(gfid)
        if fd is not None:
            self._open.move_to_end(gfid)
            return fd
        fd = self.fs.open_data(gfid)
        self._open[gfid] = fd
        if len(self._open) > MAX_OPEN_DATA:
            os.close(self._open.popitem(last=False)[1])
        return fd

    def do_ops(self, args: dict[str, Any], _p: bytes | None) -> list[dict[str, Any]]:
        return self.fs.apply_ops(args["ops"])

    def do_data_sigs(self, a: dict[str, Any], _p: bytes | None) -> dict[str, Any]:
        return blocks.handle_sigs(self._fd(a["gfid"]), a["offset"], a["length"], a["block"])

    def do_data_write(self, a: dict[str, Any], payload: bytes | None) -> int:
        return blocks.handle_write(self._fd(a["gfid"]), a["offset"], payload or b"")

    def do_data_hole(self, a: dict[str, Any], _p: bytes | None) -> None:
        blocks.handle_hole(self._fd(a["gfid"]), a["offset"], a["length"])

    def do_data_finish(self, a: dict[str, Any], _p: bytes | None) -> None:
        fd = self._fd(a["gfid"])
        try:
            blocks.handle_truncate(fd, a["size"])
            self.fs.apply_meta_fd(fd, a["meta"])
        finally:
            os.close(self._open.pop(a["gfid"]))

    def do_end_crawl(self, _a: dict[str, Any], _p: bytes | None) -> dict[str, int]:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
        return {"purged": self.fs.end_crawl()}

    def do_commit(self, _a: dict[str, Any], _p: bytes | None) -> None:
        self.fs.commit()


class Lister(_Worker):
    """Answers read-only questions without waiting behind queued writes."""

    def __init__(self, conn: ServerConnection, slots: threading.Semaphore,
                 fs: SecondaryFS) -> None:
        super().__init__(conn, slots)
        self.fs = fs

    def do_list_dir(self, a: dict[str, Any], _p: bytes | None) -> dict[str, Any]:
        return {"entries": self.fs.list_dir(a["gfid"])}

    def do_lookup(self, a: dict[str, Any], _p: bytes | None) -> list[str | None]:
        return self.fs.lookup(a["gfids"])

    def do_stat_gfid(self, a: dict[str, Any], _p: bytes | None) -> list[Any] | None:
        return self.fs.stat_gfid(a["gfid"])

    def do_ping(self, _a: dict[str, Any], _p: bytes | None) -> None:
        return None


def run_host(root: str) -> int:
    """Serve one primary on stdio until it hangs up; returns the exit status."""
    reader, writer = claim_stdio()
    conn = ServerConnection(reader, writer)
    conn.announce()
    slots = threading.Semaphore(MAX_QUEUED)
    try:
        first = conn.read_request()
        if first is None:
            return 0
        if first.method != "hello":
            conn.send_reply(first.id, error=HandshakeError("the first request must be hello"))
            return 2
        try:
            fs = SecondaryFS(os.fsencode(root), create=True)
            lister_fs = SecondaryFS(os.fsencode(root))
        except (FsError, OSError) as e:
            msg = str(e) if isinstance(e, FsError) else f"secondary root {root!r}: {e.strerror}"
            conn.send_reply(first.id, error=SecondaryError(msg))
            return 2
        conn.send_reply(first.id, {"version": VERSION, "protocol": PROTOCOL,
                                   "root_dev": os.stat(root).st_dev, "pid": os.getpid(),
                                   "host": socket.gethostname()})
        applier = EntryApplier.start(conn, slots, fs).proxy()
        lister = Lister.start(conn, slots, lister_fs).proxy()
        try:
            while True:
                req = conn.read_request()
                if req is None:
                    return 0
                slots.acquire()
                (lister if req.method in _READ_ONLY else applier).handle.defer(req)
        finally:
            pykka.ActorRegistry.stop_all(block=True, timeout=60)
            fs.close()
            lister_fs.close()
    except ProtocolError as e:
        print(f"georep secondary: protocol error: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError) as e:
        print(f"georep secondary: connection lost: {e}", file=sys.stderr)
        return 2
