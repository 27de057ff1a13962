"""Request/reply channel over a pair of byte streams (a local pipe now, ssh later).

The primary holds a :class:`Channel`: it pipelines requests (ids, futures, a bounded number
in flight) and a reader thread resolves the futures. The secondary holds a
:class:`ServerConnection` (or simply calls :func:`serve`), which announces itself with
:data:`MAGIC`, validates each request against its schema and replies in any thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import io
import itertools
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple, cast

from .errors import (
    ConnectionLost,
    HandshakeError,
    ProtocolError,
    RemoteError,
    SchemaError,
    SecondaryError,
    error_from_wire,
    error_to_wire,
)
from .framing import MAX_BODY, MAX_PAYLOAD, FrameReader, Payload, encode_frame, write_frame
from .schema import validate_request

log = logging.getLogger(__name__)

MAGIC = b"GEOREP-SECONDARY"
#: Wire protocol version, checked at hello (docs/protocol.md): 2 = data_sigs carry XXH3-128
#: block signatures (1 had blake2b-128: mixed peers would see every block differ).
PROTOCOL = 2
VERSION = "0.1.0"
MAX_ID = 2**63 - 1


#: Pipe capacity asked for (F_SETPIPE_SZ): data moves in 1 MiB writes; with the default
#: 64 KiB pipe each one costs 16 wake-ups of the other side.  Capped by
#: /proc/sys/fs/pipe-max-size; a refusal (or a socket) keeps the default.
PIPE_SIZE = 1 << 20


def widen_pipe(fd: int) -> None:
    """Ask for a PIPE_SIZE pipe buffer on ``fd`` if it is a pipe (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _buffered(f: Any) -> Any:
    # Unbuffered pipes (Popen bufsize=0) would cost a syscall per header; buffer reads.
    if isinstance(f, io.RawIOBase):
        return io.BufferedReader(f, 1 << 20)
    return f


def _valid_id(v: Any) -> bool:
    return type(v) is int and 0 <= v <= MAX_ID


class Channel:
    """Client end: pipelined calls to the secondary, replies matched by request id.

    Done-callbacks of the returned futures run in the reader thread: keep them short, and
    never block there on ``call_async`` (the reader is what frees in-flight slots).
    """

    def __init__(self, reader: BinaryIO, writer: BinaryIO, *,
                 on_closed: Callable[[str], None] | None = None, name: str = "secondary",
                 max_in_flight: int = 64, send_timeout: float = 300.0,
                 max_body: int = MAX_BODY, max_payload: int = MAX_PAYLOAD) -> None:
        self.name = name
        self._reader = _buffered(reader)
        self._writer = writer
        self._frames = FrameReader(self._reader, max_body=max_body, max_payload=max_payload)
        self._max_body, self._max_payload = max_body, max_payload
        self._on_closed = on_closed
        self._send_timeout = send_timeout
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _pending and _lost_reason
        self._write_lock = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._lost_reason: str | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self.peer: dict[str, Any] | None = None
        self.frames_sent = 0
        self.bytes_sent = 0

    # -- handshake -------------------------------------------------------------------------

    def _read_magic(self) -> None:
        got = b""
        while len(got) < len(MAGIC):
            chunk = self._reader.read1(64 - len(got))
            if not chunk:
                if got and not MAGIC.startswith(got):
                    raise HandshakeError(f"junk on stdout before the handshake: {got[:64]!r}")
                raise HandshakeError("secondary exited before the handshake")
            got += chunk
            if not MAGIC.startswith(got[: len(MAGIC)]):
                raise HandshakeError(f"junk on stdout before the handshake: {got[:64]!r}")
        if len(got) > len(MAGIC):
            raise HandshakeError(
                f"unexpected bytes after the handshake magic: {got[len(MAGIC):]!r}")

    def handshake(self, timeout: float = 30.0, *, version: str = VERSION,
                  identity: dict[str, Any] | None = None) -> dict[str, Any]:
        """Wait for the secondary's magic, exchange ``hello`` and start the reader thread.

        ``identity`` adds the optional hello fields (session, primary, host, force) the
        secondary's session lock records. Returns the secondary's hello reply (also kept
        as ``self.peer``). Raises HandshakeError on junk, early exit, timeout or a
        protocol version mismatch; an error reply to hello (a refused root, a held lock)
        is raised as rebuilt.
        """
        if self._thread is not None:
            raise HandshakeError("handshake already done")
        deadline = time.monotonic() + timeout
        box: concurrent.futures.Future[None] = concurrent.futures.Future()

        def wait_magic() -> None:
            try:
                self._read_magic()
                box.set_result(None)
            except BaseException as exc:
                box.set_exception(exc)

        threading.Thread(target=wait_magic, name=f"{self.name}-magic", daemon=True).start()
        try:
            box.result(timeout)
        except concurrent.futures.TimeoutError:
            raise HandshakeError(f"no handshake from {self.name} within {timeout:g}s")
        except OSError as exc:
            raise HandshakeError(f"reading the handshake failed: {exc}")
        self._thread = threading.Thread(target=self._read_loop, name=f"{self.name}-reader",
                                        daemon=True)
        self._thread.start()
        try:
            reply = self.call("hello", {**(identity or {}), "version": version,
                                        "protocol": PROTOCOL},
                              timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise HandshakeError(f"no hello reply from {self.name} within {timeout:g}s")
        except ConnectionLost as exc:
            raise HandshakeError(f"secondary closed the connection during hello: {exc}")
        if not isinstance(reply, dict) or type(reply.get("protocol")) is not int:
            raise HandshakeError(f"malformed hello reply: {reply!r:.100}")
        if reply["protocol"] != PROTOCOL:
            raise HandshakeError(f"protocol mismatch: primary speaks {PROTOCOL}, "
                                 f"secondary speaks {reply['protocol']}")
        self.peer = reply
        return reply

    # -- calls -------------------------------------------------------------------------------

    def call_async(self, method: str, args: dict[str, Any], payload: Payload | None = None, *,
                   timeout: float | None = None) -> concurrent.futures.Future[Any]:
        """Send one request now and return a future for its result.

        The args are checked against the method's schema first (SchemaError, nothing sent).
        Blocks while ``max_in_flight`` requests await replies (TimeoutError after ``timeout``,
        default ``send_timeout``): that is the backpressure pykka's unbounded inboxes lack.
        """
        validate_request(method, args, payload)
        if self._thread is None and method != "hello":
            raise ProtocolError("call before the handshake")
        if not self._slots.acquire(timeout=self._send_timeout if timeout is None else timeout):
            raise TimeoutError(f"{self.name}: {method}: too many requests in flight")
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()  # a sent request cannot be taken back
        req_id = next(self._ids)
        try:
            parts = encode_frame({"t": "q", "id": req_id, "m": method, "a": args}, payload,
                                 max_body=self._max_body, max_payload=self._max_payload)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            if self._lost_reason is not None:
                self._slots.release()
                raise ConnectionLost(self._lost_reason)
            self._pending[req_id] = fut
        try:
            with self._write_lock:
                n = write_frame(self._writer, parts)
                self.frames_sent += 1
                self.bytes_sent += n
        except (OSError, ValueError) as exc:  # ValueError: writing to a closed file
            self._lost(f"writing to {self.name} failed: {exc}")
        return fut

    def call(self, method: str, args: dict[str, Any] | None = None,
             payload: Payload | None = None, *, timeout: float | None = 60.0) -> Any:
        """Call ``method`` and wait for its result (re-raising the rebuilt remote error)."""
        fut = self.call_async(method, args or {}, payload, timeout=timeout)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self.name}: no reply to {method} within {timeout}s")

    # -- reader thread -----------------------------------------------------------------------

    def _read_loop(self) -> None:
        reason = f"{self.name} closed the connection"
        try:
            while True:
                frame = self._frames.read()
                if frame is None:
                    break
                self._dispatch(*frame)
        except ProtocolError as exc:
            reason = f"protocol error from {self.name}: {exc}"
        except (OSError, ValueError) as exc:
            reason = f"reading from {self.name} failed: {exc}"
        except BaseException as exc:  # never leave callers waiting forever
            reason = f"reader thread crashed: {exc!r}"
            log.exception("%s: reader thread crashed", self.name)
        self._lost(reason)

    def _dispatch(self, body: dict[Any, Any], payload: bytes | None) -> None:
        req_id: Any = body.get("id")
        if body.get("t") != "r" or not _valid_id(req_id) or ("r" in body) == ("e" in body) \
                or not set(body) <= {"t", "id", "r", "e"}:
            raise ProtocolError(f"malformed reply {body!r:.100}")
        if payload is not None:
            raise ProtocolError(f"reply {req_id} carries a payload")
        with self._lock:
            fut = self._pending.pop(req_id, None)
        if fut is None:
            raise ProtocolError(f"reply to unknown request id {req_id}")
        self._slots.release()
        if "e" in body:
            fut.set_exception(error_from_wire(body["e"]))
        else:
            fut.set_result(body["r"])

    def _lost(self, reason: str) -> None:
        with self._lock:
            if self._lost_reason is not None:
                return
            self._lost_reason = reason
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            self._slots.release()
            fut.set_exception(ConnectionLost(reason))
        if not self._closing:
            log.debug("%s: connection lost: %s", self.name, reason)
            if self._on_closed is not None:
                try:
                    self._on_closed(reason)
                except Exception:
                    log.exception("%s: on_closed callback failed", self.name)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is lost or closed; further calls raise ConnectionLost."""
        return self._lost_reason is not None

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        with self._lock:
            return len(self._pending)

    def stats(self) -> dict[str, int]:
        """Frame and byte counters in both directions, and the requests in flight."""
        return {"frames_sent": self.frames_sent, "bytes_sent": self.bytes_sent,
                "frames_received": self._frames.frames, "bytes_received": self._frames.bytes,
                "in_flight": self.in_flight}

    def close(self, timeout: float = 5.0) -> None:
        """Close our end (the secondary sees EOF), wait for the reader, fail what is pending.

        ``on_closed`` is not called for a close we asked for.
        """
        self._closing = True
        with self._write_lock:
            try:
                self._writer.close()
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._lost("channel closed")
        if self._thread is None or not self._thread.is_alive():
            try:
                self._reader.close()
            except OSError:
                pass


# -- server side -----------------------------------------------------------------------------


class Request(NamedTuple):
    """One schema-checked request as the secondary's dispatcher sees it."""

    id: int
    method: str
    args: dict[str, Any]
    payload: bytes | None


class ServerConnection:
    """Secondary end: read schema-checked requests, send replies from any thread."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO, *, max_body: int = MAX_BODY,
                 max_payload: int = MAX_PAYLOAD) -> None:
        self._frames = FrameReader(_buffered(reader), max_body=max_body,
                                   max_payload=max_payload)
        self._writer = writer
        self._max_body, self._max_payload = max_body, max_payload
        self._write_lock = threading.Lock()
        self.frames_sent = 0
        self.bytes_sent = 0

    def announce(self) -> None:
        """Write :data:`MAGIC`, the first bytes the primary expects on our stdout."""
        with self._write_lock:
            write_frame(self._writer, [MAGIC])

    def read_request(self) -> Request | None:
        """Return the next valid request, None on a clean EOF.

        A request that breaks its method's schema is answered here with a SchemaError reply
        and skipped. A malformed frame or envelope raises ProtocolError (fatal).
        """
        while True:
            frame = self._frames.read()
            if frame is None:
                return None
            body, payload = frame
            req_id: Any = body.get("id")
            method: Any = body.get("m")
            args: Any = body.get("a")
            if body.get("t") != "q" or not _valid_id(req_id) or type(method) is not str \
                    or set(body) != {"t", "id", "m", "a"}:
                raise ProtocolError(f"malformed request {body!r:.100}")
            try:
                validate_request(method, args, payload)
            except SchemaError as exc:
                self.send_reply(req_id, error=exc)
                continue
            return Request(req_id, method, args, payload)

    def send_reply(self, req_id: int, result: Any = None,
                   error: BaseException | None = None) -> None:
        """Send the reply to ``req_id``: ``result``, or ``error`` rebuilt on the primary.

        A result that cannot be encoded (or is too large) becomes a SecondaryError reply.
        Raises ConnectionLost when the primary is gone.
        """
        if error is not None:
            body: dict[str, Any] = {"t": "r", "id": req_id, "e": error_to_wire(error)}
        else:
            body = {"t": "r", "id": req_id, "r": result}
        try:
            parts = encode_frame(body, max_body=self._max_body, max_payload=self._max_payload)
        except (TypeError, ValueError, OverflowError, RemoteError) as exc:
            wire = error_to_wire(SecondaryError(f"cannot encode the reply: {exc}"))
            parts = encode_frame({"t": "r", "id": req_id, "e": wire})
        try:
            with self._write_lock:
                self.bytes_sent += write_frame(self._writer, parts)
                self.frames_sent += 1
        except (OSError, ValueError) as exc:
            raise ConnectionLost(f"writing the reply failed: {exc}")


Handler = Callable[[str, dict[str, Any], "bytes | None"], Any]


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def serve(reader: BinaryIO, writer: BinaryIO, handler: Handler, *,
          on_error_log: Callable[[str], None] | None = None) -> int:
    """Run the secondary's request loop: announce, then handle requests in order.

    ``handler(method, args, payload)`` returns the result or raises (the error is sent as
    the reply). Returns 0 on a clean EOF, 2 on a protocol error or a lost primary, after
    logging one line (never a traceback).
    """
    say = on_error_log or _stderr_line
    conn = ServerConnection(reader, writer)
    try:
        conn.announce()
        while True:
            req = conn.read_request()
            if req is None:
                return 0
            try:
                result = handler(req.method, req.args, req.payload)
            except Exception as exc:
                if not isinstance(exc, (RemoteError, OSError)):
                    say(f"georep secondary: {req.method} failed: {exc!r}")
                conn.send_reply(req.id, error=exc)
            else:
                conn.send_reply(req.id, result)
    except ProtocolError as exc:
        say(f"georep secondary: protocol error: {exc}")
    except ConnectionLost as exc:
        say(f"georep secondary: primary went away: {exc}")
    except OSError as exc:
        say(f"georep secondary: I/O error on the connection: {exc}")
    return 2


def claim_stdio() -> tuple[BinaryIO, BinaryIO]:
    """Return (stdin, stdout) as binary files for the protocol and point fd 1 at stderr.

    After this a stray ``print`` goes to stderr (relayed as a log line) instead of
    corrupting the protocol stream.
    """
    sys.stdout.flush()
    rfd, wfd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    widen_pipe(rfd)
    widen_pipe(wfd)
    return (cast(BinaryIO, os.fdopen(rfd, "rb", buffering=0)),
            cast(BinaryIO, os.fdopen(wfd, "wb", buffering=0)))


def _relay_stderr(stream: BinaryIO, handler: Callable[[bytes], None]) -> None:
    with io.BufferedReader(cast(io.RawIOBase, stream)) as lines:
        for line in lines:
            try:
                handler(line.rstrip(b"\n"))
            except Exception:
                log.exception("stderr handler failed")


def _popen(argv: list[str], env: dict[str, str] | None = None,
           cwd: str | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0, close_fds=True, env=env,
                            cwd=cwd)


#: Processes started ahead by :func:`prestart`, by argv, until spawn_local takes them.
_prestarted: dict[tuple[str, ...], subprocess.Popen[bytes]] = {}


def prestart(argv: list[str]) -> None:
    """Start ``argv`` now, for the first :func:`spawn_local` of the same argv to take.

    ``sync`` calls it before it loads its pipeline, so the secondary host's start-up (a
    Python start, or an ssh connection and its authentication) overlaps the primary's
    own.  Nothing is lost by it: a host touches nothing before the primary's hello, and
    one nobody takes sees its stdin close when this process exits (or at
    :func:`discard_prestarted`).  An argv that cannot start is left for spawn_local to
    report.
    """
    key = tuple(argv)
    if key in _prestarted:
        return
    try:
        _prestarted[key] = _popen(argv)
    except OSError:
        pass


def discard_prestarted(timeout: float = 2.0) -> None:
    """End the prestarted processes nobody took (their stdin closes: a host exits)."""
    while _prestarted:
        _, proc = _prestarted.popitem()
        if proc.stdin is not None:
            proc.stdin.close()  # EOF before hello: a host exits 0, having done nothing
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def spawn_local(argv: list[str], *, stderr_handler: Callable[[bytes], None],
                env: dict[str, str] | None = None, cwd: str | None = None,
                **channel_kwargs: Any) -> tuple[subprocess.Popen[bytes], Channel]:
    """Start ``argv`` with piped stdio and return it with a Channel on its stdin/stdout.

    Each stderr line goes to ``stderr_handler`` from a daemon thread (re-log it as
    ``remote: ...``). The handshake is left to the caller; ssh is just another argv.
    A process :func:`prestart` began with the same argv is taken instead of a new one.
    """
    proc = _prestarted.pop(tuple(argv), None) if env is None and cwd is None else None
    if proc is None:
        proc = _popen(argv, env, cwd)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    widen_pipe(proc.stdin.fileno())
    widen_pipe(proc.stdout.fileno())
    threading.Thread(target=_relay_stderr, args=(proc.stderr, stderr_handler),
                     name=f"stderr-{proc.pid}", daemon=True).start()
    channel_kwargs.setdefault("name", f"{os.path.basename(argv[0])}[{proc.pid}]")
    return proc, Channel(cast(BinaryIO, proc.stdout), cast(BinaryIO, proc.stdin),
                         **channel_kwargs)
