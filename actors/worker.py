"""One worker process per (session, brick): ``georep-node worker NAME --brick PATH``.

Started and restarted by the node supervisor (actors/node.py); not for people.  It runs
``Supervisor.run_live`` with the session's config and, every second, writes
``status.json`` in its brick state dir (schema: docs/status.md) from a
:class:`LiveStatus` that run_live keeps up to date, plus ``failures.json`` when the
ledger is not durable by itself.  It honours ``sessions/NAME/paused`` between rounds and
records when the session's checkpoint completes for its brick.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import logging.handlers
import os
import signal
import sqlite3
import sys
import threading
import time
from typing import Any

import psutil
import pykka

from actors.live import HYBRID
from actors.session import Brick, Session, SessionError, read_json, write_atomic
from fsops import marks

log = logging.getLogger("georep.worker")

STATUS_FILE = "status.json"
FAILURES_FILE = "failures.json"
CHECKPOINT_FILE = "checkpoint.json"
PID_FILE = "worker.pid"
ERR_FILE = "worker.err"
#: Counters that make "files" for the throughput figure.
FILE_COUNTERS = ("created", "linked", "renamed", "adopted", "deleted", "data_files")
BYTE_COUNTERS = ("inline_bytes", "data_bytes")


class LiveStatus:
    """What the worker is doing, for its status file (fed by Supervisor.run_live)."""

    def __init__(self, known_dirs: int = 0) -> None:
        self.status = "Initializing"
        #: Why the running worker is Faulty (set by the Supervisor; None when it is not).
        self.faulty_reason: str | None = None
        self.crawl: str | None = None
        self.last_synced: float | None = None
        self.ledger: Any = None
        self.follower: Any = None
        self.batcher_ref: Any = None
        self.syncer_refs: list[Any] = []
        self.known_dirs = known_dirs
        self.hybrid_base: int | None = None

    # hooks called by the Supervisor ---------------------------------------------------------
    def attach(self, ledger: Any) -> None:
        self.ledger = ledger

    def set_mode(self, mode: str, counters: dict[str, int]) -> None:
        self.crawl = mode
        self.status = "Active"  # connected: the secondary answered the handshake
        self.hybrid_base = counters.get("dirs_scanned", 0) if mode == HYBRID else None

    def connected(self, follower: Any, batcher_ref: Any, syncer_refs: list[Any]) -> None:
        self.follower, self.batcher_ref, self.syncer_refs = follower, batcher_ref, syncer_refs
        self.status = "Active"

    def synced(self) -> None:
        self.last_synced = time.time()

    def round_done(self, follower: Any) -> None:
        w = follower.last_work
        if w is not None and (w.records or w.gap):
            self.last_synced = time.time()

    # reading -----------------------------------------------------------------------------------
    def state(self) -> str:
        if self.follower is not None and self.follower.is_paused:
            return "Paused"
        return self.status

    def pending(self) -> dict[str, int]:
        """Cheap counts of work not yet applied (documented in docs/status.md)."""
        f = self.follower
        cur = f.current if f is not None else None
        entry = cur.records if cur is not None else 0
        meta = 0
        data = 0
        with contextlib.suppress(Exception):
            if self.batcher_ref is not None:
                meta = self.batcher_ref.actor_inbox.qsize()
            data = sum(r.actor_inbox.qsize() for r in self.syncer_refs)
        return {"entry": entry, "meta": meta, "data": data}


class Reporter:
    """Writes status.json (and failures.json) every ``interval`` s."""

    def __init__(self, session: Session, brick: Brick, live: LiveStatus,
                 interval: float = 1.0) -> None:
        self.session = session
        self.brick = brick
        self.live = live
        self.interval = interval
        self.samples: collections.deque[tuple[float, int, int, int]] = collections.deque()
        self.procs: dict[int, psutil.Process] = {}
        self.root_fd = os.open(brick.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.cp = read_json(os.path.join(brick.state, CHECKPOINT_FILE)) or {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="status", daemon=True)

    def start(self) -> None:
        self.write()
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.write()
            except Exception:  # a status tick must never kill the worker
                log.exception("status update failed")

    def close(self, status: str, reason: str | None = None) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.live.status = status
        self.live.follower = None
        try:
            self.write(reason=reason)
        finally:
            os.close(self.root_fd)

    # figures -----------------------------------------------------------------------------------
    def _proc(self, pid: int) -> dict[str, Any] | None:
        try:
            p = self.procs.get(pid)
            if p is None:
                p = self.procs[pid] = psutil.Process(pid)
                p.cpu_percent(None)
            with p.oneshot():
                io = p.io_counters() if hasattr(p, "io_counters") else None
                return {"pid": pid, "rss": p.memory_info().rss,
                        "cpu_percent": p.cpu_percent(None), "num_threads": p.num_threads(),
                        "num_fds": p.num_fds(),
                        "read_bytes": io.read_bytes if io else None,
                        "write_bytes": io.write_bytes if io else None}
        except (psutil.Error, OSError):
            self.procs.pop(pid, None)
            return None

    def resources(self) -> dict[str, Any]:
        me = psutil.Process()
        secondary = None
        with contextlib.suppress(psutil.Error):
            for c in me.children(recursive=False):
                cmd = c.cmdline()
                if (cmd and os.path.basename(cmd[0]) == "ssh") or "secondary" in cmd:
                    secondary = self._proc(c.pid)
                    break
        node = None
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(self.session.root, "node.pid")) as f:
                npid = int(f.read().split()[0])
            if npid == os.getppid():
                node = self._proc(npid)
        return {"worker": self._proc(os.getpid()), "secondary": secondary, "node": node}

    def _throughput(self, counters: dict[str, int], now: float) -> tuple[float, float, int]:
        files = sum(counters.get(k, 0) for k in FILE_COUNTERS)
        nbytes = sum(counters.get(k, 0) for k in BYTE_COUNTERS)
        dirs = counters.get("dirs_scanned", 0)
        self.samples.append((now, files, nbytes, dirs))
        while len(self.samples) > 2 and now - self.samples[0][0] > 60:
            self.samples.popleft()
        t0, f0, b0, _ = self.samples[0]
        span = now - t0
        if span <= 0:
            return 0.0, 0.0, dirs
        return (files - f0) / span, (nbytes - b0) / span, dirs

    def _eta(self, dirs: int, now: float) -> float | None:
        live = self.live
        if live.crawl != HYBRID or live.hybrid_base is None or not live.known_dirs:
            return None
        done = dirs - live.hybrid_base
        left = live.known_dirs - done
        t0, _, _, d0 = self.samples[0]
        rate = (dirs - d0) / (now - t0) if now > t0 else 0
        if left <= 0 or rate <= 0:
            return None
        return round(left / rate, 1)

    def _checkpoint(self, entry: int | None, stime: int | None,
                    failures: list[Any]) -> dict[str, Any] | None:
        t = self.session.checkpoint()
        if t is None:
            return None
        if self.cp.get("time") != t:
            self.cp = {"time": t, "completion_time": None}
        if self.cp.get("completion_time") is None:
            t_ns = int(t * 1e9)
            older = [f for f in failures if f.first_seen and f.first_seen < t]
            if (entry is not None and stime is not None and entry >= t_ns and stime >= t_ns
                    and not older):
                self.cp["completion_time"] = time.time()
                write_atomic(os.path.join(self.brick.state, CHECKPOINT_FILE),
                             json.dumps(self.cp))
                log.warning("checkpoint completed session=%s brick=%s checkpoint=%.0f",
                            self.session.name, self.brick.path, t)
        return {"time": t, "completed": self.cp.get("completion_time") is not None,
                "completion_time": self.cp.get("completion_time")}

    def write(self, reason: str | None = None) -> None:
        now = time.time()
        live = self.live
        ledger = live.ledger
        counters = dict(ledger.counters) if ledger is not None else {}
        failures = ledger.failures() if ledger is not None else []
        name = self.session.name
        entry = marks.read_mark(self.root_fd, name, "entry_stime")
        stime = marks.read_mark(self.root_fd, name, "stime")
        fps, bps, dirs = self._throughput(counters, now)
        doc = {
            "version": 1,
            "session": name,
            "brick": self.brick.path,
            "brick_id": self.brick.id,
            "secondary": self.brick.secondary,
            "status": live.state(),
            "crawl": live.crawl,
            "last_synced": live.last_synced,
            "entry_stime": entry / 1e9 if entry is not None else None,
            "stime": stime / 1e9 if stime is not None else None,
            "pending": live.pending(),
            "failures": len(failures),
            "checkpoint": self._checkpoint(entry, stime, failures),
            "throughput": {"files_per_s": round(fps, 2), "bytes_per_s": round(bps, 1)},
            "eta": self._eta(dirs, now),
            "faulty_reason": reason if reason is not None else live.faulty_reason,
            "pid": os.getpid(),
            "resources": self.resources(),
            "updated": now,
        }
        write_atomic(os.path.join(self.brick.state, STATUS_FILE),
                     json.dumps(doc, indent=1, sort_keys=True))
        if ledger is not None and getattr(ledger, "path", None) is None:
            rows = []
            for f in failures:
                to_json = getattr(f, "to_json", None)
                rows.append(to_json() if to_json else {
                    "kind": f.kind, "op": f.op, "path": os.fsdecode(f.path),
                    "errno": f.errno, "message": f.message, "attempts": f.attempts,
                    "first_seen": f.first_seen, "last_seen": f.last_seen})
            write_atomic(os.path.join(self.brick.state, FAILURES_FILE),
                         json.dumps({"version": 1, "failures": rows}, indent=1))


def _setup_logging(session: Session, brick: Brick) -> None:
    level = getattr(logging, session.get("log-level"))
    h = logging.handlers.WatchedFileHandler(os.path.join(session.dir, "georep.log"))
    h.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s %(name)s: session={session.name} brick={brick.id} "
        "pid=%(process)d %(message)s"))
    h.setLevel(level)
    root = logging.getLogger()
    for other in root.handlers:  # stderr (worker.err) keeps errors only: the faulty reason
        if isinstance(other, logging.StreamHandler) and not isinstance(
                other, logging.FileHandler):
            other.setLevel(logging.ERROR)
    root.addHandler(h)
    root.setLevel(level)


def _known_dirs(state: str) -> int:
    path = os.path.join(state, "dirmap.db")
    if not os.path.exists(path):
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            return int(db.execute("SELECT COUNT(*) FROM dirs").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def run_worker(name: str, brick_path: str) -> int:
    """The worker's main: replicate one brick until SIGTERM; 0 on a clean stop."""
    from actors.supervisor import Supervisor, SyncOptions

    try:
        session = Session(name).load()
        brick = session.brick(brick_path)
    except SessionError as e:
        print(f"georep-node worker: {e}", file=sys.stderr)
        return 2
    os.makedirs(brick.state, mode=0o700, exist_ok=True)
    write_atomic(os.path.join(brick.state, PID_FILE), f"{os.getpid()}\n")
    _setup_logging(session, brick)
    for key, k in sorted(_unused_keys(session).items()):
        log.warning("config key %s=%s is accepted but not yet used (docs/config.md)", key, k)
    bw = session.get("bandwidth-limit")
    from actors.engines import parse_rate

    opts = SyncOptions(
        primary=brick.path, secondary=brick.secondary, jobs=int(session.get("sync-jobs")),
        max_ops=int(session.get("batch-max-ops")), timeout=float(session.get("timeout")),
        session=name, ssh_command=session.get("ssh-command"),
        remote_command=session.get("remote-command"), state_dir=session.root,
        recorder_linger=float(session.get("recorder-linger")), worker_state=brick.state,
        exclude=tuple(p for p in session.get("exclude").split(",") if p),
        ignore_deletes=session.get("ignore-deletes") == "true",
        sync_xattrs=session.get("sync-xattrs") == "true",
        sync_acls=session.get("sync-acls") == "true",
        secondary_timeout=float(session.get("secondary-timeout"))
        if session.is_set("secondary-timeout") else None)
    for attr, value in (("engine", session.get("sync-engine")),
                        ("bwlimit", parse_rate(bw) if bw != "0" else None),
                        ("compress", session.get("compress") == "true")):
        if hasattr(opts, attr):
            setattr(opts, attr, value)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    live = LiveStatus(_known_dirs(brick.state))
    reporter = Reporter(session, brick, live)
    reporter.start()
    log.warning("worker started primary=%s secondary=%s", brick.path, brick.secondary)
    rc, final, reason = 0, "Stopped", None
    try:
        sup = Supervisor.start(opts)
        try:
            fut = sup.proxy().run_live(stop, live, lambda: session.paused)
            while True:
                try:
                    fut.get(timeout=0.5)
                    break
                except pykka.Timeout:
                    continue
        finally:
            sup.stop()
    except Exception as e:
        rc, final, reason = 2, "Faulty", f"{type(e).__name__}: {e}" if not str(e) else str(e)
        log.error("worker failed reason=%r", reason)
        print(f"georep-node worker: {reason}", file=sys.stderr)
    finally:
        pykka.ActorRegistry.stop_all(block=True, timeout=30)
        reporter.close(final, reason)
    log.warning("worker stopped status=%s", final)
    return rc


def _unused_keys(session: Session) -> dict[str, str]:
    from actors.session import KEYS

    return {k: session.get(k) for k, key in KEYS.items()
            if not key.used and session.is_set(k) and session.get(k) != key.default}
