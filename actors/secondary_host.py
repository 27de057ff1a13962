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

At ``hello`` the host takes the root's session lock (fsops.session_lock) and keeps it
until it exits.  It exits on its own after ``--timeout`` seconds without a request (the
primary pings when idle).  Started as ``secondary --restrict-root PATH`` (an ssh forced
command) it serves only PATH, whatever root the client asks for.  See docs/ssh.md.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import pykka

from actors.faults import fault
from actors.inspect import Inspectable
from fsops import blocks
from fsops.secondary import NotFound as FsNotFound
from fsops.secondary import SecondaryError as FsError
from fsops.secondary import SecondaryFS
from fsops.secondary_apply import ParallelApplier
from fsops.session_lock import Locked, LockInfo, SessionLock
from transport import (
    PROTOCOL,
    VERSION,
    ConnectionLost,
    HandshakeError,
    LockedError,
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
#: Threads applying the local ops of an ``ops`` batch (fsops.secondary_apply), unless
#: the host's environment sets ``GEOREP_APPLY_THREADS``.  1 (one at a time): on the
#: 2-CPU benchmark machine more threads made first syncs slower (BENCHMARKS.md).
APPLY_THREADS = 1


def apply_threads(env: Mapping[str, str]) -> int:
    """Pool size for parallel apply: ``GEOREP_APPLY_THREADS`` (1 to 64), else the default."""
    raw = env.get("GEOREP_APPLY_THREADS")
    try:
        n = int(raw) if raw is not None else APPLY_THREADS
    except ValueError:
        log.warning("ignoring GEOREP_APPLY_THREADS=%r (not a number)", raw)
        return APPLY_THREADS
    return max(1, min(64, n))

#: Requests after which the ``secondary_after_apply`` fault point fires (actors/faults.py).
_FAULTY = frozenset({"ops", "data_write", "data_finish", "end_crawl", "commit"})
_READ_ONLY = frozenset({"list_dir", "lookup", "stat_gfid", "ping", "count", "inspect"})


def _out_of_band(req: Request) -> bool:
    """Read-only requests skip the queue, unless they asked to wait their turn."""
    return req.method in _READ_ONLY and not req.args.get("ordered")


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, FsNotFound):
        return NotFound(str(exc))
    if isinstance(exc, FsError):
        return SecondaryError(str(exc))
    return exc


class _Gate:
    """Bounds the requests queued in the actors and tells how long the host was idle.

    Idle means no request read and none being handled: the primary pings every 30 s
    when it has nothing else to send, so a longer silence means it is gone or stuck.
    """

    def __init__(self, limit: int) -> None:
        self._slots = threading.Semaphore(limit)
        self._lock = threading.Lock()
        self._busy = 0
        self._last = time.monotonic()

    def acquire(self) -> None:
        """Take a slot for a request just read (waits while ``limit`` are queued)."""
        with self._lock:
            self._busy += 1
            self._last = time.monotonic()
        self._slots.acquire()

    def release(self) -> None:
        """The request was answered."""
        with self._lock:
            self._busy -= 1
            self._last = time.monotonic()
        self._slots.release()

    def touch(self) -> None:
        """A request arrived (or the handshake is in progress)."""
        with self._lock:
            self._last = time.monotonic()

    def idle_for(self) -> float:
        """Seconds without any request read or in progress."""
        with self._lock:
            return 0.0 if self._busy else time.monotonic() - self._last


class _Worker(Inspectable, pykka.ThreadingActor):
    """Common part: run a request, send its reply from this actor's thread."""

    def __init__(self, conn: ServerConnection, slots: _Gate) -> None:
        super().__init__()
        self.conn = conn
        self.slots = slots
        self.handled = 0

    def inspect_name(self, message: Any) -> str:
        """``handle`` messages are named by the request they carry (for the shell)."""
        args = getattr(message, "args", None)
        if args and isinstance(args[0], Request):
            return args[0].method
        return super().inspect_name(message)

    def handle(self, req: Request) -> None:
        """Run one request and reply; a failure is a reply, never the actor's death."""
        try:
            try:
                result = getattr(self, "do_" + req.method)(req.args, req.payload)
            except Exception as exc:
                if not isinstance(exc, OSError | FsError):
                    log.exception("%s failed", req.method)
                self.conn.send_reply(req.id, error=_translate(exc))
            else:
                if req.method in _FAULTY:
                    fault("secondary_after_apply")
                self.conn.send_reply(req.id, result)
        except ConnectionLost as exc:
            # Nobody can read our replies any more: what is applied is on disk and every
            # op is idempotent, so end now and free the session lock for a reconnect.
            _die(f"georep secondary: primary went away: {exc}", 2)
        finally:
            self.handled += 1
            self.slots.release()


class EntryApplier(_Worker):
    """Applies entry, meta and data requests in arrival order."""

    def __init__(self, conn: ServerConnection, slots: _Gate, fs: SecondaryFS, *,
                 threads: int = APPLY_THREADS) -> None:
        super().__init__(conn, slots)
        self.fs = fs
        self.batches = ParallelApplier(fs, threads)
        self._open: OrderedDict[bytes, int] = OrderedDict()

    def on_stop(self) -> None:
        self.batches.close()
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def inspect_extra(self) -> dict[str, Any]:
        """Ops applied by the pool vs one at a time (read from the inspecting thread)."""
        return {"apply_threads": self.batches.threads, "ops_parallel": self.batches.parallel,
                "ops_serial": self.batches.serial}

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
        return self.batches.apply_ops(args["ops"])

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

    def do_list_dir(self, a: dict[str, Any], _p: bytes | None) -> dict[str, Any]:
        # An ordered listing: it sees every op sent before it.
        return {"entries": self.fs.list_dir(a["gfid"], a.get("names"))}


class Lister(_Worker):
    """Answers read-only questions without waiting behind queued writes."""

    def __init__(self, conn: ServerConnection, slots: _Gate, fs: SecondaryFS) -> None:
        super().__init__(conn, slots)
        self.fs = fs

    def do_list_dir(self, a: dict[str, Any], _p: bytes | None) -> dict[str, Any]:
        return {"entries": self.fs.list_dir(a["gfid"], a.get("names"))}

    def do_lookup(self, a: dict[str, Any], _p: bytes | None) -> list[str | None]:
        return self.fs.lookup(a["gfids"])

    def do_stat_gfid(self, a: dict[str, Any], _p: bytes | None) -> list[Any] | None:
        return self.fs.stat_gfid(a["gfid"])

    def do_ping(self, _a: dict[str, Any], _p: bytes | None) -> None:
        return None

    def do_inspect(self, _a: dict[str, Any], _p: bytes | None) -> dict[str, Any]:
        """This host's actors and resources (read without asking them: actors/inspect.py)."""
        from actors.control import secondary_snapshot

        return secondary_snapshot()

    def do_count(self, a: dict[str, Any], _p: bytes | None) -> dict[str, Any]:
        """Objects beneath the root (symlinks not followed, ``.georep`` excluded), up to
        ``limit``; ``complete`` is False when the walk stopped there."""
        return count_entries(self.fs.root_fd, a.get("limit", COUNT_LIMIT))


#: Most objects ``count`` walks before it answers "at least this many".
COUNT_LIMIT = 10_000_000


def count_entries(root_fd: int, limit: int = COUNT_LIMIT) -> dict[str, Any]:
    """Recursive count of the objects beneath an open root, without following symlinks."""
    n = 0
    for _dirpath, dirnames, filenames, _dfd in os.fwalk(".", dir_fd=root_fd,
                                                        follow_symlinks=False):
        if _dirpath == ".":
            dirnames[:] = [d for d in dirnames if d != ".georep"]
            filenames = [f for f in filenames if f != ".georep"]
        n += len(dirnames) + len(filenames)
        if n >= limit:
            return {"entries": n, "complete": False}
    return {"entries": n, "complete": True}


def _die(line: str, status: int) -> None:
    # The reader thread is blocked in read(2) on stdin and cannot be woken: end the
    # process.  Everything applied is on disk; the kernel releases the session lock.
    print(line, file=sys.stderr, flush=True)
    os._exit(status)


def _watchdog(gate: _Gate, limit: list[float]) -> None:
    # ``limit[0]`` may be changed by the hello (the session's secondary-timeout).
    def loop() -> None:
        while True:
            timeout = limit[0]
            time.sleep(min(1.0, timeout / 4))
            if gate.idle_for() > timeout:
                _die(f"georep secondary: no request from the primary for {timeout:g} s; "
                     "exiting", 2)

    threading.Thread(target=loop, name="idle-watchdog", daemon=True).start()


def restricted_root(restrict_root: str, root: str | None,
                    original_command: str | None) -> tuple[str | None, str | None]:
    """Decide what a host started as ``secondary --restrict-root R`` may serve.

    Returns ``(root, refusal)``.  sshd puts the command the client asked for in
    SSH_ORIGINAL_COMMAND when a forced command runs instead; it must be a
    ``... secondary --root PATH`` command whose PATH resolves to R.  ``root`` is None
    when the client did not ask for a georep secondary at all (``ssh host id``).
    """
    allowed = os.path.realpath(restrict_root)
    requested = root
    if original_command is not None:
        try:
            words = shlex.split(original_command)
        except ValueError:
            words = []
        rest = words[words.index("secondary") + 1:] if "secondary" in words else None
        if rest is not None and len(rest) == 2 and rest[0] == "--root":
            requested = rest[1]
        elif rest is not None and len(rest) == 1 and rest[0].startswith("--root="):
            requested = rest[0].split("=", 1)[1]
        else:
            return None, (f"this ssh key may only run 'georep-node secondary --root "
                          f"{restrict_root}'; refused {original_command[:200]!r}")
    if requested is None or os.path.realpath(requested) == allowed:
        return restrict_root, None
    return requested, (f"this ssh key is restricted to secondary root {restrict_root}; "
                       f"refused root {requested}")


def _open_fs(root: str) -> tuple[SecondaryFS, SecondaryFS]:
    # Create the root itself, never its parents: a missing parent is more likely a typo
    # or an unmounted disk than a place where a replica should appear.
    if not os.path.lexists(root):
        try:
            os.mkdir(root, 0o755)
        except FileNotFoundError:
            raise FsError(f"secondary root {root} does not exist, nor does its parent "
                          f"directory {os.path.dirname(os.path.abspath(root))}")
        except FileExistsError:
            pass
        except OSError as e:
            raise FsError(f"cannot create secondary root {root}: {e.strerror}")
    fs = SecondaryFS(os.fsencode(root))
    try:
        return fs, SecondaryFS(os.fsencode(root))
    except BaseException:
        fs.close()
        raise


def _take_lock(fs: SecondaryFS, root: str, hello: dict[str, Any],
               timeout: float) -> SessionLock:
    now = time.time()
    info = LockInfo(session=hello.get("session") or f"anonymous-{os.getpid()}",
                    host=hello.get("host", ""), primary=hello.get("primary", ""),
                    pid=os.getpid(), since=now, heartbeat=now)
    lock = SessionLock(fs.root_fd, root, info)
    try:
        old = lock.acquire(force=bool(hello.get("force")), stale_after=timeout)
    except BaseException:
        lock.release()
        raise
    if old is not None:
        log.warning("took over the lock of %s from %s", root, old.describe())

    def lost(owner: LockInfo | None) -> None:
        who = owner.describe() if owner else "another process"
        _die(f"georep secondary: the lock on {root} was taken over by {who}; exiting", 3)

    lock.start_heartbeat(min(30.0, timeout / 4), lost)
    return lock


def run_host(root: str | None, *, timeout: float = 120.0,
             restrict_root: str | None = None) -> int:
    """Serve one primary on stdio until it hangs up; returns the exit status.

    ``timeout``: exit after that many seconds without a request.  ``restrict_root``:
    serve only that root, whatever root the client asked for (see :func:`restricted_root`).
    """
    refusal = None
    if restrict_root is not None:
        root, refusal = restricted_root(restrict_root, root,
                                        os.environ.get("SSH_ORIGINAL_COMMAND"))
        if root is None:
            print(f"georep secondary: {refusal}", file=sys.stderr)
            return 2
    if root is None:
        print("georep secondary: --root is required", file=sys.stderr)
        return 2
    reader, writer = claim_stdio()
    conn = ServerConnection(reader, writer)
    conn.announce()
    gate = _Gate(MAX_QUEUED)
    limit = [timeout]
    _watchdog(gate, limit)
    try:
        first = conn.read_request()
        if first is None:
            return 0
        if first.method != "hello":
            conn.send_reply(first.id, error=HandshakeError("the first request must be hello"))
            return 2
        if refusal is not None:
            print(f"georep secondary: {refusal}", file=sys.stderr)
            conn.send_reply(first.id, error=SecondaryError(refusal))
            return 2
        try:
            fs, lister_fs = _open_fs(root)
        except (FsError, OSError) as e:
            msg = str(e) if isinstance(e, FsError) else f"secondary root {root}: {e.strerror}"
            conn.send_reply(first.id, error=SecondaryError(msg))
            return 2
        # The session's settings (docs/config.md): secondary-timeout, sync-xattrs/acls.
        timeout = limit[0] = float(first.args.get("idle_timeout", timeout))
        fs.xattr_scope = lister_fs.xattr_scope = first.args.get("xattrs", fs.xattr_scope)
        try:
            lock = _take_lock(fs, root, first.args, timeout)
        except (Locked, OSError) as e:
            fs.close()
            lister_fs.close()
            msg = str(e) if isinstance(e, Locked) else f"cannot lock {root}: {e}"
            print(f"georep secondary: {msg}", file=sys.stderr)
            conn.send_reply(first.id, error=LockedError(msg))
            return 2
        conn.send_reply(first.id, {"version": VERSION, "protocol": PROTOCOL,
                                   "root_dev": os.stat(root).st_dev, "pid": os.getpid(),
                                   "host": socket.gethostname()})
        applier = EntryApplier.start(conn, gate, fs,
                                     threads=apply_threads(os.environ)).proxy()
        lister = Lister.start(conn, gate, lister_fs).proxy()
        try:
            while True:
                req = conn.read_request()
                if req is None:
                    return 0
                if req.method == "hello":
                    conn.send_reply(req.id, error=HandshakeError("hello was already done"))
                    continue
                gate.acquire()
                (lister if _out_of_band(req) else applier).handle.defer(req)
        finally:
            pykka.ActorRegistry.stop_all(block=True, timeout=60)
            fs.close()
            lister_fs.close()
            lock.release()
    except ProtocolError as e:
        print(f"georep secondary: protocol error: {e}", file=sys.stderr)
        return 2
    except pykka.ActorDeadError as e:
        print(f"georep secondary: stopped: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, ConnectionLost, OSError) as e:
        print(f"georep secondary: connection lost: {e}", file=sys.stderr)
        return 2
