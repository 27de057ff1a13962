"""The node supervisor: ``georep-node node [--foreground]``, one per host (state root).

It runs one worker process (``georep-node worker NAME --brick PATH``, actors/worker.py)
per brick of every session that is started (``sessions/NAME/started``), restarts a dead
worker with exponential backoff (1 s doubling to 60 s, reset after a healthy minute) and
meanwhile marks it Faulty in its status file with the last lines of its stderr.  It
exits when no session is started.

Single instance: ``node.pid`` in the state root, held with ``flock`` for the node's
life (a pid file nobody holds is stale).  Control: the unix socket ``node.sock`` (mode
0600; a peer whose uid is neither ours nor root is refused, by SO_PEERCRED) speaking the
project's frames (transport.framing): one request ``{"op": ..., "session": ...}``, one
reply ``{"ok": bool, "error"?: str, ...}`` per connection.  Ops: ``ping``, ``start``,
``stop`` (SIGTERM the session's workers and wait; with ``recorders``, stop its
recorder daemons too),
``workers``.  Optional Prometheus text metrics on 127.0.0.1 (``metrics-port``).
"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from actors.session import (
    Brick,
    Session,
    SessionError,
    list_sessions,
    read_json,
    state_root,
    write_atomic,
)
from transport.framing import FrameReader, encode_message

log = logging.getLogger("georep.node")

PID_FILE, SOCK_FILE, LOG_FILE = "node.pid", "node.sock", "node.log"
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY = 1.0, 60.0, 60.0
STOP_WAIT = 30.0
STATES = ("Initializing", "Active", "Faulty", "Paused", "Stopped")


class NodeError(Exception):
    """The node cannot be reached or refused a request (one line for people)."""


# -- client side --------------------------------------------------------------------------

def request(root: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the node of ``root``; its reply (NodeError when unreachable)."""
    path = os.path.join(root, SOCK_FILE)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(encode_message(body))
            with s.makefile("rb") as f:
                got = FrameReader(f).read()
        except OSError as e:
            raise NodeError(f"node supervisor not reachable at {path}: {e.strerror or e}") from e
    if got is None:
        raise NodeError("node supervisor closed the connection")
    reply = got[0]
    if not reply.get("ok"):
        raise NodeError(str(reply.get("error", "refused")))
    return reply


def node_pid(root: str) -> int | None:
    """Pid of the running node, None when none runs (a stale pid file is ignored)."""
    path = os.path.join(root, PID_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 64, 0).split()
            return int(raw[0]) if raw else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it: stale
    finally:
        os.close(fd)


def ensure_node(root: str, timeout: float = 20.0) -> int:
    """Start the node daemon unless it runs; its pid once it answers."""
    from transport.endpoint import georep_argv

    deadline = time.monotonic() + timeout
    spawned = 0.0
    while True:
        pid = node_pid(root)
        if pid is not None:
            with contextlib.suppress(NodeError):
                request(root, {"op": "ping"}, timeout=5)
                return pid
        elif not spawned or time.monotonic() - spawned > 3:
            # (again after 3 s: the one we started may have met an exiting node's lock)
            env = dict(os.environ, GEOREP_STATE_DIR=root)
            with open(os.path.join(root, LOG_FILE), "ab") as logf:
                subprocess.Popen([*georep_argv(), "node", "--foreground", "--state-dir", root],
                                 env=env,
                                 stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 start_new_session=True, close_fds=True, cwd="/")
            spawned = time.monotonic()
        if time.monotonic() > deadline:
            raise NodeError(f"the node supervisor did not start within {timeout:.0f} s "
                            f"(see {os.path.join(root, LOG_FILE)})")
        time.sleep(0.05)


def pid_alive(pid: int | None, needle: str = "") -> bool:
    """True if ``pid`` runs (and, with ``needle``, its command line contains it)."""
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return not needle or needle in " ".join(p.cmdline())
    except psutil.Error:
        return False


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _terminate(pids: list[int], timeout: float) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def stop_recorders(session: Session) -> None:
    """SIGTERM the recorder daemons of the session's bricks and wait for them."""
    pids = []
    for b in session.bricks():
        pid = _read_pid(os.path.join(b.state, "recorder.ready"))
        if pid and pid_alive(pid, "recorder"):
            pids.append(pid)
    _terminate(pids, 20)


def stray_workers(session: Session) -> list[int]:
    """Worker processes of the session found by their pid files (a node that died)."""
    out = []
    for b in session.bricks():
        pid = _read_pid(os.path.join(b.state, "worker.pid"))
        if pid and pid_alive(pid, f"worker {session.name}"):
            out.append(pid)
    return out


def mark_status(brick: Brick, status: str, reason: str | None = None, **extra: Any) -> None:
    """Overwrite the state fields of a brick's status file (node's view of a dead worker)."""
    path = os.path.join(brick.state, "status.json")
    doc = read_json(path) or {"version": 1, "brick": brick.path, "secondary": brick.secondary,
                              "brick_id": brick.id}
    doc.update(status=status, faulty_reason=reason, updated=time.time(), **extra)
    if status != "Active":
        doc["resources"] = {"worker": None, "secondary": None, "node": None}
    os.makedirs(brick.state, mode=0o700, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True))


def last_error(brick: Brick, since: int = 0, lines: int = 3) -> str | None:
    """The last lines the worker wrote on stderr after offset ``since``."""
    try:
        with open(os.path.join(brick.state, "worker.err"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    got = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(got) or None


# -- the daemon ---------------------------------------------------------------------------

@dataclass
class Worker:
    session: str
    brick: Brick
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_FIRST
    next_start: float = 0.0
    restarts: int = 0
    error: str | None = None
    err_offset: int = 0
    exits: list[int] = field(default_factory=list)


class Node:
    """The node supervisor's state and loops."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.lock = threading.RLock()
        self.workers: dict[tuple[str, str], Worker] = {}
        self.stopping: set[str] = set()
        self.done = threading.Event()
        self.metrics: dict[int, http.server.ThreadingHTTPServer] = {}

    # lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        pid_path = os.path.join(self.root, PID_FILE)
        fd = os.open(pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"georep-node node: already running (pid "
                  f"{os.pread(fd, 32, 0).decode().strip()})", file=sys.stderr)
            os.close(fd)
            return 0
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        sock_path = os.path.join(self.root, SOCK_FILE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)  # we hold the lock: any socket left is a dead node's
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            srv.bind(sock_path)
        finally:
            os.umask(old)
        os.chmod(sock_path, 0o600)
        srv.listen(16)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.done.set())
        threading.Thread(target=self._serve, args=(srv,), name="control", daemon=True).start()
        log.warning("node started pid=%d root=%s", os.getpid(), self.root)
        try:
            self._monitor()
        finally:
            srv.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock_path)
            self._stop_all()
            for m in self.metrics.values():
                m.shutdown()
            os.ftruncate(fd, 0)
            os.close(fd)
            log.warning("node stopped")
        return 0

    def _wanted(self) -> list[Session]:
        out = []
        for name in list_sessions(self.root):
            s = Session(name, self.root)
            if s.started and name not in self.stopping:
                with contextlib.suppress(SessionError):
                    s.load()
                    out.append(s)
        return out

    def _monitor(self) -> None:
        idle_since: float | None = None
        while not self.done.wait(0.2):
            wanted = self._wanted()
            with self.lock:
                self._tick(wanted)
                busy = bool(wanted) or bool(self.workers) or bool(self.stopping)
            if busy:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 1.0:
                log.warning("no session is running: node exits")
                return
            self._metrics(wanted)

    def _tick(self, wanted: list[Session]) -> None:
        now = time.monotonic()
        keys = set()
        for s in wanted:
            for b in s.bricks():
                key = (s.name, b.id)
                keys.add(key)
                if key not in self.workers:
                    self.workers[key] = Worker(s.name, b)
        for key, w in list(self.workers.items()):
            if w.proc is not None and w.proc.poll() is not None:
                rc = w.proc.returncode
                ran = now - w.started_at
                w.proc = None
                if ran >= HEALTHY:
                    w.backoff = BACKOFF_FIRST
                if rc < 0:
                    why = f"worker killed by {signal.Signals(-rc).name}"
                else:
                    why = f"worker exited with status {rc}"
                err = last_error(w.brick, w.err_offset)
                w.error = f"{why}: {err}" if err else why
                w.next_start = now + w.backoff
                log.warning("worker died session=%s brick=%s status=%s ran=%.1fs "
                            "restart_in=%.0fs reason=%r", w.session, w.brick.path, rc, ran,
                            w.backoff, w.error)
                mark_status(w.brick, "Faulty", w.error, pid=None,
                            restart_at=time.time() + w.backoff)
                w.backoff = min(BACKOFF_MAX, w.backoff * 2)
            if key not in keys:
                if w.proc is None:
                    del self.workers[key]
                continue
            if w.proc is None and now >= w.next_start:
                self._spawn(w)

    def _spawn(self, w: Worker) -> None:
        from transport.endpoint import georep_argv

        os.makedirs(w.brick.state, mode=0o700, exist_ok=True)
        env = dict(os.environ, GEOREP_STATE_DIR=self.root)
        with open(os.path.join(w.brick.state, "worker.err"), "ab") as err:
            w.err_offset = err.seek(0, os.SEEK_END)
            w.proc = subprocess.Popen(
                [*georep_argv(), "worker", w.session, "--brick", w.brick.path,
                 "--state-dir", self.root], env=env,
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, close_fds=True, cwd="/")
        w.started_at = time.monotonic()
        if w.restarts or w.error:
            log.warning("worker restarted session=%s brick=%s pid=%d restarts=%d",
                        w.session, w.brick.path, w.proc.pid, w.restarts + 1)
            w.restarts += 1
        else:
            log.warning("worker started session=%s brick=%s pid=%d", w.session, w.brick.path,
                        w.proc.pid)

    def stop_session(self, name: str, recorders: bool = False) -> None:
        with self.lock:
            self.stopping.add(name)
            mine = [w for (s, _), w in self.workers.items() if s == name]
            for w in mine:
                del self.workers[(name, w.brick.id)]
        try:
            pids = [w.proc.pid for w in mine if w.proc is not None and w.proc.poll() is None]
            session = Session(name, self.root)
            if session.exists():
                session.load()
                pids += [p for p in stray_workers(session) if p not in pids]
            _terminate(pids, STOP_WAIT)
            for w in mine:
                if w.proc is not None:
                    w.proc.wait(timeout=5)
            if session.exists():
                if recorders:
                    stop_recorders(session)
                for b in session.bricks():
                    st = read_json(os.path.join(b.state, "status.json")) or {}
                    if st.get("status") != "Stopped":
                        mark_status(b, "Stopped", None, pid=None)
            log.warning("session stopped session=%s workers=%d", name, len(pids))
        finally:
            with self.lock:
                self.stopping.discard(name)

    def _stop_all(self) -> None:
        with self.lock:
            names = {s for s, _ in self.workers}
        for name in names:
            with contextlib.suppress(Exception):
                self.stop_session(name)

    # control socket ------------------------------------------------------------------------
    def _serve(self, srv: socket.socket) -> None:
        while not self.done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
                _, uid, _ = struct.unpack("3i", creds)
                if uid not in (0, os.geteuid()):
                    reply: dict[str, Any] = {"ok": False, "error": f"uid {uid} not allowed"}
                else:
                    conn.settimeout(30)
                    with conn.makefile("rb") as f:
                        got = FrameReader(f, max_body=65536).read()
                    conn.settimeout(None)
                    reply = self._dispatch(got[0] if got else {})
            except Exception as e:
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            with contextlib.suppress(OSError):
                conn.sendall(encode_message(reply))

    def _dispatch(self, req: dict[Any, Any]) -> dict[str, Any]:
        op = req.get("op")
        name = req.get("session")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "workers":
            with self.lock:
                rows = [{"session": w.session, "brick": w.brick.path,
                         "pid": w.proc.pid if w.proc else None, "restarts": w.restarts,
                         "error": w.error} for w in self.workers.values()]
            return {"ok": True, "workers": rows}
        if op in ("start", "stop"):
            if not isinstance(name, str):
                return {"ok": False, "error": "session (str) is required"}
            try:
                Session(name, self.root).load()
            except SessionError as e:
                return {"ok": False, "error": str(e)}
            if op == "stop":
                self.stop_session(name, bool(req.get("recorders")))
            else:
                with self.lock:
                    self._tick(self._wanted())
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    # metrics ---------------------------------------------------------------------------------
    def _metrics(self, wanted: list[Session]) -> None:
        for s in wanted:
            port = int(s.get("metrics-port"))
            if port and port not in self.metrics:
                try:
                    self.metrics[port] = _serve_metrics(self.root, port)
                    log.warning("metrics on http://127.0.0.1:%d/metrics", port)
                except OSError as e:
                    log.error("metrics port %d: %s", port, e)
                    self.metrics[port] = None  # type: ignore[assignment]


def metrics_text(root: str) -> str:
    """Prometheus text exposition of every brick's status file."""
    from actors.status import collect

    lines = ["# HELP georep_up 1 for the brick's current status (label status).",
             "# TYPE georep_up gauge"]
    rows = [r for s in collect(root) for r in s["bricks"]]
    more: list[str] = []
    for r in rows:
        lab = f'session="{r["session"]}",brick="{r["brick"]}"'
        lines.append(f'georep_up{{{lab},status="{r["status"]}"}} 1')
        for metric, value in (("last_synced_seconds", r.get("last_synced")),
                              ("stime_seconds", r.get("stime")),
                              ("entry_stime_seconds", r.get("entry_stime")),
                              ("failures", r.get("failures")),
                              ("files_per_second", (r.get("throughput") or {}).get("files_per_s")),
                              ("bytes_per_second", (r.get("throughput") or {}).get("bytes_per_s")),
                              ("checkpoint_completed",
                               int(bool((r.get("checkpoint") or {}).get("completed"))))):
            if value is not None:
                more.append(f"georep_{metric}{{{lab}}} {value}")
        for kind, n in (r.get("pending") or {}).items():
            more.append(f'georep_pending{{{lab},kind="{kind}"}} {n}')
    return "\n".join(lines + more) + "\n"


def _serve_metrics(root: str, port: int) -> http.server.ThreadingHTTPServer:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = metrics_text(root).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, name="metrics", daemon=True).start()
    return srv


def run_node(foreground: bool) -> int:
    """``georep-node node``: run in the foreground, or start the daemon and return."""
    root = state_root()
    if not foreground:
        try:
            pid = ensure_node(root)
        except NodeError as e:
            print(f"georep-node node: {e}", file=sys.stderr)
            return 2
        print(f"georep-node node: running (pid {pid})")
        return 0
    logging.getLogger().setLevel(logging.INFO)
    return Node(root).run()
