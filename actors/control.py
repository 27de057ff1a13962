"""The worker's control socket: what ``georep-node shell`` talks to.

A unix socket ``control.sock`` in the worker's state directory, mode 0600, that only
root or the worker's own user may use (checked with ``SO_PEERCRED`` on every
connection, besides the mode and the 0700 state directory).  One thread per
connection; frames as on the wire (:mod:`transport.framing`).  A request is
``{"m": name, "a": {...}}``; the reply is ``{"r": result}`` or
``{"e": {"type", "message"}}``.  Requests (the allowlist, :data:`COMMANDS`):

- ``actors``: every actor of the worker and of its secondary host (asked through the
  channel with the protocol's out-of-band ``inspect``), one row each.
- ``actor {name}``: one actor's row with per-method counts, recent messages, extras.
- ``batches``: the channel's requests in flight, the Batcher's pending ops, the
  Syncers' queues.
- ``failures``: the ledger.
- ``resources``: CPU, memory, threads and fds of the worker, its secondary host (the
  local child or ssh), the recorder daemon, and the secondary host as seen remotely.
- ``restart {name}``: restart an actor; see :class:`Restarts`.
- ``pause`` / ``resume``: create or remove ``paused`` in the session's directory
  (``<state root>/sessions/NAME``; for an unnamed ``sync`` that is its state directory),
  the single source of truth: ``georep-node pause/resume NAME`` write the same file
  (actors/session.py) and every brick's worker checks it between rounds.

Nothing here asks an actor (a busy actor would block the shell for as long): actor
state is read from the fields :class:`actors.inspect.Inspectable` keeps.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, cast

import psutil

from actors.inspect import live_actors, snapshot_actors
from transport.framing import FrameReader, encode_message
from transport.schema import Shape, str_len

log = logging.getLogger("georep.control")

CONTROL_SOCKET = "control.sock"
PAUSED_FILE = "paused"
RECORDER_READY = "recorder.ready"

#: Restart scopes: the Crawler/Batcher/Syncer pipeline only, or the connection too.
PIPELINE, CONNECTION = "pipeline", "connection"
_SCOPE = {"crawler": PIPELINE, "batcher": PIPELINE, "syncer": PIPELINE,
          "pipeline": PIPELINE, "remoteproxy": CONNECTION, "entryapplier": CONNECTION,
          "lister": CONNECTION, "secondary": CONNECTION, "connection": CONNECTION}

_NAME = str_len(1, 64)


def _seconds(v: Any) -> str | None:
    ok = type(v) in (int, float) and 0 <= v <= 600
    return None if ok else "must be a number of seconds (0..600)"


#: The allowlist: request name -> shape of its arguments.
COMMANDS: dict[str, Shape] = {
    "actors": Shape({}),
    "actor": Shape({"name": _NAME}),
    "batches": Shape({}),
    "failures": Shape({}),
    "resources": Shape({}),
    "restart": Shape({"name": _NAME}, {"wait": _seconds}),
    "pause": Shape({}, {"wait": _seconds}),
    "resume": Shape({}),
    "session": Shape({}),
}


class ControlError(Exception):
    """A control request was refused or failed (one line for people)."""


# -- pause, the shared flag ----------------------------------------------------------------

def is_paused(state: str) -> bool:
    """True while ``<state>/paused`` exists."""
    return os.path.exists(os.path.join(state, PAUSED_FILE))


def set_paused(state: str, paused: bool) -> None:
    """Create or remove ``<state>/paused`` (the worker notices between rounds)."""
    path = os.path.join(state, PAUSED_FILE)
    if paused:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} {os.getpid()}\n")
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def paused_check(state: str, other: Callable[[], bool] | None = None) -> Callable[[], bool]:
    """What the Follower asks between rounds: the file, or'ed with ``other`` if given."""
    if other is None:
        return lambda: is_paused(state)
    return lambda: is_paused(state) or other()


# -- restart requests ------------------------------------------------------------------------

class Restarts:
    """Restart requests, handled by the Supervisor between rounds.

    pykka has no supervisor and the pipeline's actors hold each other's proxies (the
    Crawler feeds the Batcher, which feeds the Syncers, all sharing credits), so an
    actor restarted alone would be unreachable to the others.  A restart therefore
    rebuilds the worker's pipeline: the Follower ends its current round (making it
    durable), the Supervisor stops Crawler, Batcher and Syncers in reverse and starts
    fresh ones, which resume from the marks (History Crawl).  Restarting the
    RemoteProxy, EntryApplier or Lister also reconnects (a new secondary host).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.pending: str | None = None
        #: Bumped each time a pipeline starts.
        self.generation = 0

    def request(self, scope: str) -> int:
        """Ask for a restart of ``scope``; returns the current generation."""
        with self._cond:
            if self.pending != CONNECTION:
                self.pending = scope
            return self.generation

    def take(self) -> str | None:
        """The pending scope, cleared (the Supervisor calls this before building)."""
        with self._cond:
            scope, self.pending = self.pending, None
            return scope

    def started(self) -> None:
        """A new pipeline is being built."""
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait_beyond(self, generation: int, timeout: float) -> bool:
        """Wait until a pipeline newer than ``generation`` started."""
        with self._cond:
            return self._cond.wait_for(lambda: self.generation > generation, timeout)


class RoundStop(threading.Event):
    """The ``stop`` the Follower checks between rounds: the worker's stop or a restart."""

    def __init__(self, stop: threading.Event, restarts: Restarts) -> None:
        super().__init__()
        self._stop = stop
        self._restarts = restarts

    def is_set(self) -> bool:
        return self._stop.is_set() or self._restarts.pending is not None

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                break
            self._stop.wait(left)
        return self.is_set()


# -- socket plumbing -------------------------------------------------------------------------

def _sun_path(path: str) -> tuple[str, int | None]:
    """A path usable in sockaddr_un (108 bytes): long ones go through /proc/self/fd."""
    if len(os.fsencode(path)) < 100:
        return path, None
    fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{os.path.basename(path)}", fd


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    """Connect to a control socket (OSError when nobody listens)."""
    sun, fd = _sun_path(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(sun)
        s.settimeout(None)
        return s
    except BaseException:
        s.close()
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _send(sock: socket.socket, body: dict[str, Any]) -> None:
    sock.sendall(encode_message(body))


class ControlClient:
    """The shell's end: one request at a time over one connection."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.sock = connect(path, timeout)
        self._frames = FrameReader(cast(BinaryIO, self.sock.makefile("rb")))

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        """Send a request and return its result (ControlError when refused or failed)."""
        _send(self.sock, {"m": method, "a": args or {}})
        frame = self._frames.read()
        if frame is None:
            raise ControlError("the worker closed the control connection")
        body = frame[0]
        if "e" in body:
            err = body["e"]
            raise ControlError(f"{err.get('message')}" if isinstance(err, dict) else str(err))
        return body.get("r")

    def close(self) -> None:
        """Hang up."""
        self.sock.close()


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


# -- the server ------------------------------------------------------------------------------

Handler = Callable[[str, dict[str, Any]], Any]


class ControlServer:
    """Listens on a unix socket and answers allowlisted requests with ``handler``."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Bind (mode 0600) and serve from a daemon thread; OSError if another worker owns it."""
        self._remove_stale()
        sun, fd = _sun_path(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(sun)
            # The state directory is 0700, so the moment between bind and chmod is harmless.
            os.chmod(sun, 0o600)
            s.listen(8)
            s.settimeout(0.5)
        except BaseException:
            s.close()
            raise
        finally:
            if fd is not None:
                os.close(fd)
        self._sock = s
        threading.Thread(target=self._accept_loop, name="georep-control", daemon=True).start()

    def _remove_stale(self) -> None:
        if not os.path.lexists(self.path):
            return
        try:
            connect(self.path, timeout=1.0).close()
        except OSError:
            os.unlink(self.path)  # left by a worker that died
            return
        raise OSError(errno.EADDRINUSE, f"another worker serves {self.path}")

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                raise
            threading.Thread(target=self._serve, args=(conn,), name="georep-control-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            uid = peer_uid(conn)
            if uid not in (0, os.geteuid()):
                log.warning("control connection from uid %d refused", uid)
                _send(conn, {"e": {"type": "PermissionError",
                                   "message": f"uid {uid} may not control this worker"}})
                return
            frames = FrameReader(cast(BinaryIO, conn.makefile("rb")))
            while not self._closed.is_set():
                frame = frames.read()
                if frame is None:
                    return
                _send(conn, self._answer(frame[0]))
        except Exception as exc:  # a broken client must not disturb the worker
            log.debug("control connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _answer(self, body: dict[Any, Any]) -> dict[str, Any]:
        method, args = body.get("m"), body.get("a", {})
        try:
            shape = COMMANDS.get(method) if isinstance(method, str) else None
            if shape is None or not isinstance(method, str):
                raise ControlError(f"unknown request {method!r:.40}")
            if type(args) is not dict:
                raise ControlError(f"{method}: arguments must be a map")
            why = shape.check(args)
            if why:
                raise ControlError(f"{method}: {why}")
            return {"r": self.handler(method, args)}
        except Exception as exc:
            if not isinstance(exc, ControlError):
                log.warning("control request %s failed", method, exc_info=True)
            return {"e": {"type": type(exc).__name__, "message": str(exc)}}

    def close(self) -> None:
        """Stop listening, hang up every client, remove the socket."""
        self._closed.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# -- what the worker answers -----------------------------------------------------------------

_PROCS: dict[int, psutil.Process] = {}


def process_info(pid: int | None, role: str) -> dict[str, Any]:
    """CPU, memory, threads and fds of one process (CPU % since the previous call)."""
    row: dict[str, Any] = {"role": role, "pid": pid}
    if pid is None:
        return {**row, "error": "not running"}
    try:
        p = _PROCS.get(pid)
        if p is None or not p.is_running():
            p = _PROCS[pid] = psutil.Process(pid)
        with p.oneshot():
            mem = p.memory_info()
            row.update(cpu_percent=p.cpu_percent(None),
                       cpu_seconds=round(sum(p.cpu_times()[:2]), 2), rss=mem.rss,
                       threads=p.num_threads(), fds=p.num_fds(),
                       uptime=round(time.time() - p.create_time(), 1),
                       command=" ".join(p.cmdline()[:4])[:80])
    except (psutil.Error, OSError) as exc:
        _PROCS.pop(pid, None)
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def secondary_snapshot() -> dict[str, Any]:
    """What the secondary host answers to ``inspect``: its actors and its resources."""
    return {"actors": snapshot_actors(detail=True), "host": socket.gethostname(),
            "resources": process_info(os.getpid(), "secondary host")}


def _recorder_pid(state: str) -> int | None:
    try:
        with open(os.path.join(state, RECORDER_READY)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class WorkerControl:
    """Answers the control requests of one worker (the handler of its ControlServer).

    ``worker`` is the Supervisor *object* (not a proxy: it is busy running the session);
    only its plain fields are read: ``session``, ``ledger``, ``crawl_mode``.
    """

    def __init__(self, worker: Any, state: str, restarts: Restarts, *,
                 pause_dir: str | None = None, remote_timeout: float = 5.0) -> None:
        self.worker = worker
        self.state = state
        #: Where ``paused`` lives: the session's directory (all its bricks pause together).
        self.pause_dir = pause_dir or state
        self.restarts = restarts
        self.remote_timeout = remote_timeout

    def __call__(self, method: str, args: dict[str, Any]) -> Any:
        return getattr(self, "do_" + method)(**args)

    # -- helpers

    def _actors_of(self, cls: str) -> list[Any]:
        return [a for a in live_actors() if type(a).__name__ == cls
                and not a.actor_stopped.is_set()]

    def _remote_proxy(self) -> Any:
        found = self._actors_of("RemoteProxy")
        return found[-1] if found else None

    def _channel(self) -> Any:
        rp = self._remote_proxy()
        ch = getattr(rp, "_channel", None) if rp is not None else None
        return None if ch is None or ch.closed else ch

    def _remote(self) -> tuple[dict[str, Any] | None, str | None]:
        ch = self._channel()
        if ch is None:
            return None, "not connected"
        try:
            return ch.call("inspect", {}, timeout=self.remote_timeout), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"

    # -- requests

    def _paused_now(self) -> bool:
        follower = getattr(self.worker, "follower", None)
        return bool(getattr(follower, "is_paused", False))

    def do_session(self) -> dict[str, Any]:
        w = self.worker
        return {"session": w.session, "state": self.state, "pid": os.getpid(),
                "paused": is_paused(self.pause_dir), "paused_now": self._paused_now(),
                "mode": getattr(w, "crawl_mode", ""),
                "generation": self.restarts.generation,
                "primary": w.options.primary, "secondary": str(w.endpoint)}

    def do_actors(self, detail: bool = False) -> dict[str, Any]:
        remote, why = self._remote()
        return {**self.do_session(), "worker": snapshot_actors(detail=detail),
                "secondary_actors": None if remote is None else remote.get("actors"),
                "secondary_error": why}

    def do_actor(self, name: str) -> dict[str, Any]:
        full = self.do_actors(detail=True)
        want = name.lower()
        found = [{"side": side, **row}
                 for side, rows in (("worker", full["worker"]),
                                    ("secondary", full["secondary_actors"] or []))
                 for row in rows if want in (row["name"].lower(), row["class"].lower())]
        if not found:
            raise ControlError(f"no actor named {name!r} (try: actors)")
        return {"actors": found, "secondary_error": full["secondary_error"]}

    def do_batches(self) -> dict[str, Any]:
        ch = self._channel()
        batchers = [a.inspect_extra() for a in self._actors_of("Batcher")]
        syncers = [{"mailbox": a.actor_inbox.qsize(), **a.inspect_extra()}
                   for a in self._actors_of("Syncer")]
        return {"channel": None if ch is None else ch.stats(), "batcher": batchers,
                "syncers": syncers}

    def do_failures(self) -> dict[str, Any]:
        rows = []
        for f in self.worker.ledger.failures():
            rows.append({"kind": f.kind, "op": f.op, "path": os.fsdecode(f.path),
                         "errno": f.errno, "message": f.message,
                         "attempts": getattr(f, "attempts", 1),
                         "last_seen": getattr(f, "last_seen", 0.0)})
        return {"failures": rows, "counters": dict(self.worker.ledger.counters)}

    def do_resources(self) -> dict[str, Any]:
        rp = self._remote_proxy()
        proc = getattr(rp, "process", None) if rp is not None else None
        local_role = ("secondary host (local)" if rp is not None and rp.endpoint.is_local
                      else "ssh to the secondary")
        rows = [process_info(os.getpid(), "worker"),
                process_info(proc.pid if proc is not None else None, local_role),
                process_info(_recorder_pid(self.state), "recorder")]
        remote, why = self._remote()
        if remote is not None:
            rows.append({**remote.get("resources", {}), "role": "secondary host (remote view)",
                         "host": remote.get("host")})
        return {"processes": rows, "secondary_error": why}

    def do_restart(self, name: str, wait: float = 30.0) -> dict[str, Any]:
        key = name.lower().split("#")[0]
        if key == "supervisor":
            raise ControlError("the Supervisor is the worker itself: restart the session "
                               "(georep-node stop/start) instead")
        scope = _SCOPE.get(key)
        if scope is None:
            raise ControlError(f"cannot restart {name!r}: one of Crawler, Batcher, Syncer "
                               "(the pipeline) or RemoteProxy, EntryApplier, Lister (the "
                               "connection)")
        t0 = time.monotonic()
        gen = self.restarts.request(scope)
        done = self.restarts.wait_beyond(gen, float(wait))
        what = ("Crawler, Batcher and Syncers" if scope == PIPELINE
                else "the connection, the secondary host and the pipeline")
        if not done:
            return {"restarted": False, "scope": scope,
                    "message": f"restart of {what} requested; it happens after the round "
                               "in progress"}
        return {"restarted": True, "scope": scope, "generation": self.restarts.generation,
                "message": f"restarted {what} in {time.monotonic() - t0:.2f} s"}

    def do_pause(self, wait: float = 10.0) -> dict[str, Any]:
        set_paused(self.pause_dir, True)
        deadline = time.monotonic() + wait
        while not self._paused_now() and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the Follower's flag: it has no event to wait on
        if not self._paused_now():
            return {"paused": False, "message": "pause requested; the round in progress "
                    "finishes first"}
        return {"paused": True, "message": "paused: no round runs until resume (the "
                "recorder keeps journaling)"}

    def do_resume(self) -> dict[str, Any]:
        set_paused(self.pause_dir, False)
        return {"paused": False, "message": "resumed"}


def start_control(worker: Any, state: str, restarts: Restarts,
                  pause_dir: str | None = None) -> ControlServer | None:
    """Serve ``<state>/control.sock`` for ``worker``; None (logged) when that cannot be.

    ``pause_dir``: the session's directory, whose ``paused`` file pauses every brick.
    """
    server = ControlServer(os.path.join(state, CONTROL_SOCKET),
                           WorkerControl(worker, state, restarts, pause_dir=pause_dir))
    try:
        server.start()
    except OSError as exc:
        log.warning("no control socket: %s", exc)
        return None
    return server
