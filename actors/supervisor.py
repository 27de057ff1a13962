"""Supervisor: builds the pipeline of one worker, runs it, stops it in reverse.

``run_once`` is the ``sync --once`` job: connect to the secondary host, run a hybrid
crawl (Crawler -> Batcher -> EntryApplier on the secondary, data through the Syncer
pool), let the secondary purge what was deleted, make it durable, and only then move
the marks on the primary root.  When items failed, one more crawl retries them (it
re-derives exactly what is still different); what still fails is reported, never
dropped.

One connection serves the whole run.  When it drops in the middle of a pass (ssh
killed, network gone), the Supervisor reconnects with backoff (1, 2, 4... s, up to
``RECONNECT_TRIES`` tries) and restarts the pass from the beginning: every op is
gfid-checked and idempotent, so replaying is safe.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pykka

from actors.batcher import MAX_BYTES_IN_FLIGHT, MAX_OPS_IN_FLIGHT, Batcher, Credits
from actors.control import Restarts, RoundStop, paused_check, start_control
from actors.crawler import Crawler, CrawlResult
from actors.engines import NATIVE, EngineSpec, TokenBucket
from actors.faults import fault
from actors.inspect import Inspectable
from actors.ledger import FILE_NAME as LEDGER_FILE
from actors.ledger import Failure, Ledger
from actors.live import CHANGELOG, HISTORY, HYBRID, Follower
from actors.reconcile import Rules
from actors.recorder_host import (
    Heartbeat,
    add_worker_pid,
    ensure_recorder,
    heartbeat,
    journal_dir,
)
from actors.remote import PING_INTERVAL, ConnectError, RemoteProxy
from actors.syncer import Syncer
from fsops import marks, xattrs
from fsops.constants import ROOT_GFID
from fsops.dirmap import DirMap, default_state_root, make_private_dirs
from fsops.journal import JournalReader
from fsops.journal_tail import JournalTail
from fsops.primary import PrimaryTree
from fsops.safety import SafetyStop, check_primary, check_root, primary_is_empty
from transport import Channel
from transport.endpoint import Endpoint, parse_secondary, session_ssh_command

log = logging.getLogger("georep.supervisor")

#: Reconnect attempts after the connection drops in a pass (waits 1, 2, 4, 8, 16 s).
RECONNECT_TRIES = 5
#: Continuous mode: how often a Faulty worker (safety stop) looks at the primary again.
SAFETY_RECHECK = 3.0
#: Continuous mode: pipeline restarts after a dead or stuck actor wait 1, 2, 4... s up to this.
RESTART_MAX_DELAY = 60.0
#: How often the watchdog looks at the pipeline's actors (seconds).
WATCHDOG_INTERVAL = 1.0
#: After an abort, how long the Supervisor waits for the pipeline's driver to notice (its
#: waits on the closed channel fail at once) before leaving it behind, blocked on a stuck
#: actor, and building a new pipeline.
ABORT_GRACE = 5.0


class PipelineRestart(Exception):
    """The watchdog found an actor dead or stuck: rebuild the pipeline from the marks."""


@dataclass
class SyncOptions:
    """What one ``sync`` run needs to know."""

    primary: str
    secondary: str
    jobs: int = 2
    max_ops: int = 1024
    #: Flow control: ops and inline bytes between the Crawler and the secondary's replies
    #: (actors/batcher.Credits); what bounds the worker's memory.
    max_ops_in_flight: int = MAX_OPS_IN_FLIGHT
    max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT
    retries: int = 1
    timeout: float = 600.0
    session: str | None = None
    ssh_command: str = "ssh"
    remote_command: str = "georep-node"
    force: bool = False
    reconnects: int = RECONNECT_TRIES
    #: Continuous mode: where the session keeps its journal, directory map and log.
    state_dir: str | None = None
    #: Continuous mode: the recorder daemon stops after this long without a worker.
    recorder_linger: float = 600.0
    #: Confirm that an empty (or re-mounted) primary root is wanted (fsops/safety.py).
    allow_empty_primary: bool = False
    #: Continuous mode: an actor busy with one message longer than this is stuck (watchdog).
    busy_limit: float = 900.0
    #: How file data travels: "native" (georep's block delta on the connection),
    #: "rsync" or "tarssh" (one external process per batch; actors/engines.py).
    engine: str = "native"
    #: Bandwidth limit for file data in bytes/s (all Syncers together); None: none.
    bwlimit: int | None = None
    #: ssh compression (-C) for the connection and the engines' ssh.
    compress: bool = False
    #: Continuous mode: this worker's own state directory (journal, dirmap), used instead
    #: of ``<state_dir>/sessions/<session>`` (the node gives each brick its own).
    worker_state: str | None = None
    #: Glob patterns of entries not to replicate (actors/reconcile.Rules; docs/config.md).
    exclude: tuple[str, ...] = ()
    #: Leave on the secondary what the primary deletes (renames are still applied).
    ignore_deletes: bool = False
    #: Replicate xattrs other than ACLs (user, trusted, security), and POSIX ACLs; what
    #: is not replicated is left alone on the secondary.
    sync_xattrs: bool = True
    sync_acls: bool = True
    #: The secondary host exits after this long without a request (None: its default).
    secondary_timeout: float | None = None

    def rules(self) -> Rules:
        """The exclude and ignore-deletes rules of the crawl."""
        return Rules(self.exclude, ignore_deletes=self.ignore_deletes)

    def xattr_scope(self) -> str:
        """Which xattrs both ends manage (fsops.xattrs scopes)."""
        return xattrs.scope_of(self.sync_xattrs, self.sync_acls)


@dataclass
class Summary:
    """The outcome of a run, for people (``lines``) and scripts (``as_dict``)."""

    primary: str
    secondary: str
    passes: int = 0
    seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    transfer: dict[str, int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the secondary converged with no failure left."""
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly form."""
        return {
            "primary": self.primary, "secondary": self.secondary, "ok": self.ok,
            "passes": self.passes, "seconds": round(self.seconds, 3),
            "counters": dict(sorted(self.counters.items())),
            "transfer": self.transfer, "marks": self.marks,
            "failures": [f.line() for f in self.failures],
        }


def session_id(primary: str, secondary: Endpoint) -> str:
    """A stable id for an unnamed session (primary, secondary) pair."""
    key = f"{os.path.abspath(primary)}\0{secondary}".encode()
    return hashlib.sha1(key, usedforsecurity=False).hexdigest()[:12]


class Supervisor(Inspectable, pykka.ThreadingActor):
    """Owns a worker's actors and runs sync passes."""

    def __init__(self, options: SyncOptions) -> None:
        super().__init__()
        self.options = options
        self.endpoint = parse_secondary(options.secondary)
        self.session = options.session or session_id(options.primary, self.endpoint)
        #: Where the worker keeps state.json and failures.json (None: not writable).
        self.state_dir = self._make_state_dir()
        self.ledger = Ledger(os.path.join(self.state_dir, LEDGER_FILE)
                             if self.state_dir else None)
        #: Why the worker is Faulty (a safety stop, a dead or stuck actor); None when not.
        self.faulty_reason: str | None = None
        self._remote: pykka.ActorRef[Any] | None = None
        self._abort = threading.Event()
        #: The pipeline's in-flight budget, and the largest peaks of the earlier ones.
        self._last_credits: Credits | None = None
        self._old_peaks = (0, 0)
        self._abort_reason = ""
        self._bucket = TokenBucket(options.bwlimit) if options.bwlimit else None

    def _ssh_command(self) -> str:
        """The ssh client and options for the connection and the engines (-C: --compress)."""
        o = self.options
        return session_ssh_command(o.ssh_command, compress=o.compress)

    def _start_syncers(self, channel: Channel, primary: PrimaryTree) -> list[pykka.ActorRef[Any]]:
        """The Syncer pool, with the data engine and the shared bandwidth limit."""
        o = self.options
        jobs = max(1, o.jobs)
        engine = None
        if o.engine != NATIVE:
            engine = EngineSpec(o.engine, o.primary, self.endpoint, ssh_command=self._ssh_command(),
                                bwlimit=o.bwlimit, jobs=jobs, bucket=self._bucket)
        return [Syncer.start(channel, primary, self.ledger, timeout=o.timeout, engine=engine,
                             bucket=self._bucket) for _ in range(jobs)]

    def _make_state_dir(self) -> str | None:
        path = self.state_path()
        try:
            make_private_dirs(path)
        except OSError as e:
            log.warning("no state directory %s (%s): failures are not kept across runs and "
                        "the primary's device is not checked", path, e.strerror)
            return None
        return path

    def _safety(self, primary: PrimaryTree | None, channel: Channel) -> None:
        """The safety stop (fsops/safety.py): raises SafetyStop."""
        o = self.options

        def root_entries() -> int:
            reply = channel.call("list_dir", {"gfid": ROOT_GFID}, timeout=o.timeout)
            return len(reply["entries"])

        def count() -> tuple[int, bool]:
            r = channel.call("count", {}, timeout=o.timeout)
            return int(r["entries"]), bool(r["complete"])

        check_primary(os.path.abspath(o.primary), secondary_root_entries=root_entries,
                      secondary_count=count, state_dir=self.state_dir,
                      root_fd=primary.root_fd if primary is not None else None,
                      allow_empty=o.allow_empty_primary)

    def run_once(self) -> Summary:
        """Make the secondary equal to the primary now; see the module docstring."""
        o = self.options
        t0 = time.monotonic()
        summary = Summary(o.primary, str(self.endpoint))
        primary = PrimaryTree(os.fsencode(o.primary), xattr_scope=o.xattr_scope())
        try:
            self._connect()
            self.ledger.position_ns = marks.read_mark(primary.root_fd, self.session,
                                                      "stime") or 0
            transfer: dict[str, int] = {}
            for n in range(1 + o.retries):
                if n:
                    log.info("retrying failed items pass=%d failures=%d", n + 1,
                             len(self.ledger.failures()))
                # A full crawl re-derives every failure: one that does not come back
                # (from this run or, through failures.json, from an earlier one) is fixed.
                self.ledger.clear_failures()
                started_ns, moved = self._pass_reconnecting(primary)
                self.ledger.settle()
                for k, v in moved.items():
                    transfer[k] = transfer.get(k, 0) + v
                summary.passes = n + 1
                if started_ns is not None:
                    self._write_marks(primary, started_ns, summary)
                    break
            summary.transfer = transfer
            summary.counters = dict(self.ledger.counters)
            summary.counters.update(self._flow_peaks)
            summary.failures = self.ledger.failures()
        finally:
            self.ledger.flush()
            if self._remote is not None:
                self._remote.stop()
            primary.close()
        summary.seconds = time.monotonic() - t0
        return summary

    # -- connection ------------------------------------------------------------------------

    def _connect(self) -> Channel:
        """Start a RemoteProxy and shake hands (ConnectError: one line for people)."""
        o = self.options
        if self._remote is not None:
            self._remote.stop()
            self._remote = None
        identity: dict[str, Any] = {"session": self.session,
                                    "primary": os.path.abspath(o.primary),
                                    "host": socket.gethostname(), "force": o.force}
        # Session settings for the host, sent only when not its defaults (an older host
        # that does not know them still accepts the default hello).
        ping = PING_INTERVAL
        if o.xattr_scope() != xattrs.ALL:
            identity["xattrs"] = o.xattr_scope()
        if o.secondary_timeout is not None:
            identity["idle_timeout"] = max(1, math.ceil(o.secondary_timeout))
            ping = min(ping, identity["idle_timeout"] / 4)
        self._remote = RemoteProxy.start(self.endpoint, ssh_command=self._ssh_command(),
                                         remote_command=o.remote_command, identity=identity,
                                         ping_interval=ping)
        proxy = self._remote.proxy()
        proxy.connect().get(timeout=o.timeout)
        channel: Channel = proxy.channel().get(timeout=o.timeout)
        return channel

    def _pass_reconnecting(self, primary: PrimaryTree) -> tuple[int | None, dict[str, int]]:
        """One pass, restarted from the beginning on a new connection when the old one drops.

        Ops are idempotent and gfid-checked, so replaying what the lost pass already sent
        is safe.  Returns (the pass's start time when it converged and the secondary made
        it durable, else None; transfer stats).
        """
        o = self.options
        assert self._remote is not None
        channel: Channel = self._remote.proxy().channel().get(timeout=o.timeout)
        tries = 0
        while True:
            try:
                # Inside the try: a connection that drops during the check reconnects.
                self._safety(primary, channel)
                started_ns = time.time_ns()
                moved = self._one_pass(primary, channel)
                if self.ledger.failures() and not channel.closed:
                    return None, moved
                # Marks move only after the secondary says everything applied is durable.
                channel.call("commit", {}, timeout=o.timeout)
                return started_ns, moved
            except Exception as e:
                if not channel.closed:
                    raise
                reason = str(e)
            while True:
                if tries >= o.reconnects:
                    raise ConnectError(f"connection to {self.endpoint} lost and {tries} "
                                       f"reconnect(s) failed: {reason}")
                delay = 2 ** tries
                tries += 1
                log.warning("connection to %s lost (%s); reconnecting in %d s (try %d/%d)",
                            self.endpoint, reason, delay, tries, o.reconnects)
                time.sleep(delay)  # backoff, not synchronization
                try:
                    channel = self._connect()
                    break
                except ConnectError as ce:
                    reason = str(ce)
            self.ledger.count("reconnects")
            self.ledger.clear_failures()  # the restarted pass re-derives what still differs

    def _one_pass(self, primary: PrimaryTree, channel: Any) -> dict[str, int]:
        o = self.options
        credits = self._credits()
        done: Future[CrawlResult] = Future()
        started: list[pykka.ActorRef[Any]] = []
        try:
            syncer_refs = self._start_syncers(channel, primary)
            started += syncer_refs
            syncers = [r.proxy() for r in syncer_refs]
            batcher_ref = Batcher.start(channel, self.ledger, syncers, credits, max_ops=o.max_ops)
            started.append(batcher_ref)
            crawler_ref = Crawler.start(primary, channel, batcher_ref.proxy(), self.ledger,
                                        credits, timeout=o.timeout, rules=o.rules())
            started.append(crawler_ref)
            crawler_ref.proxy().begin.defer(done)
            done.result(timeout=None)
            batcher_ref.proxy().drain().get(timeout=o.timeout * 6)
            purged = channel.call("end_crawl", {}, timeout=o.timeout)
            self.ledger.count("purged", int(purged.get("purged", 0)))
            transfer: dict[str, int] = {}
            for s in syncers:
                for k, v in s.stats().get(timeout=o.timeout).items():
                    transfer[k] = transfer.get(k, 0) + v
            return transfer
        finally:
            for ref in reversed(started):
                ref.stop(block=True, timeout=o.timeout)

    def _credits(self) -> Credits:
        """A fresh in-flight budget for a pipeline; its peaks go to the summary."""
        old = self._last_credits
        if old is not None:
            self._old_peaks = (max(self._old_peaks[0], old.peak_ops),
                               max(self._old_peaks[1], old.peak_bytes))
        credits = Credits(self.options.max_ops_in_flight, self.options.max_bytes_in_flight)
        self._last_credits = credits
        return credits

    @property
    def _flow_peaks(self) -> dict[str, int]:
        c = self._last_credits
        if c is None:
            return {}
        return {"peak_ops_in_flight": max(self._old_peaks[0], c.peak_ops),
                "peak_inline_bytes_in_flight": max(self._old_peaks[1], c.peak_bytes)}

    def _write_marks(self, primary: PrimaryTree, started_ns: int, summary: Summary) -> None:
        self.ledger.flush()  # a mark never passes a failure that is only in memory
        fault("before_mark")
        for which in ("entry_stime", "stime"):
            marks.write_mark(primary.root_fd, self.session, which, started_ns)
            summary.marks[which] = started_ns

    # -- continuous mode ---------------------------------------------------------------------

    def state_path(self) -> str:
        """The session's state directory (journal, directory map, logs)."""
        if self.options.worker_state:
            return self.options.worker_state
        root = self.options.state_dir or default_state_root()
        return os.path.join(root, "sessions", self.session)

    def run_live(self, stop: threading.Event, status: Any = None,
                 paused: Callable[[], bool] | None = None) -> Summary:
        """Replicate continuously until ``stop`` is set; see actors/live.py.

        The recorder daemon is started first (or found running), so nothing that changes
        from now on escapes the journal.  A dropped connection restarts the whole worker
        pipeline after a backoff; it resumes from the marks (History Crawl).

        ``status`` (optional, an ``actors.worker_status.LiveStatus``) is told what the
        worker does, for its status file; ``paused`` (optional) is asked between rounds:
        while it says True the worker replicates nothing but keeps its connection.
        """
        o = self.options
        self._status = status
        self._paused = paused
        if status is not None:
            status.attach(self.ledger)
        t0 = time.monotonic()
        summary = Summary(o.primary, str(self.endpoint))
        state = self.state_path()
        make_private_dirs(state)  # journals and sockets: private, as named sessions make it
        # <root>/sessions/<session>/paused pauses the session: the shell and the CLI agree.
        session_dir = os.path.join(o.state_dir or default_state_root(), "sessions", self.session)
        self._paused = paused_check(session_dir, paused)
        primary: PrimaryTree | None = None
        ensure_recorder(os.path.abspath(o.primary), state, linger=o.recorder_linger)
        beats = Heartbeat(state, os.path.abspath(o.primary), o.recorder_linger)
        dirmap = DirMap(os.path.join(state, "dirmap.db"))
        self.restarts = Restarts()
        control = start_control(self, state, self.restarts, session_dir)
        tries = 0
        restarts = 0
        last_reason = ""
        try:
            while not stop.is_set():
                try:
                    if primary is None:
                        check_root(os.path.abspath(o.primary), state_dir=self.state_dir,
                                   allow_empty=o.allow_empty_primary)
                        primary = PrimaryTree(os.fsencode(o.primary),
                                              xattr_scope=o.xattr_scope())
                    if not self._keep_connection():
                        self._connect()
                        if self.endpoint.is_local and self._remote is not None:
                            pid = self._remote.proxy().stats().get(timeout=o.timeout)["pid"]
                            if pid:
                                add_worker_pid(state, pid)
                    tries = 0
                    self.restarts.started()
                    # One abort event per pipeline: a driver left behind keeps its own, set.
                    self._abort, self._abort_reason = threading.Event(), ""
                    round_stop = _PipelineStop(stop, self.restarts, self._abort)
                    self._drive(functools.partial(self._live, primary, dirmap, state,
                                                  round_stop, summary))
                    restarts = 0
                except ConnectError:
                    raise
                except SafetyStop as e:
                    # Invariant 3: halt with the reason in status, come back by ourselves.
                    if primary is not None:
                        primary.close()
                        primary = None
                    self._stop_remote()
                    self._wait_for_primary(str(e), stop)
                except Exception as e:
                    channel_dead = self._remote is None or self._remote_closed()
                    reason = self._abort_reason if self._abort.is_set() else None
                    if reason is None and (not channel_dead
                                           or isinstance(e, pykka.ActorDeadError)):
                        reason = f"an actor failed: {type(e).__name__}: {e}"
                    if reason is not None:
                        # Watchdog: a dead or stuck actor.  Rebuild the pipeline; it resumes
                        # from the marks (History Crawl), and the ledger is on disk.
                        stack, self._abort_stack = self._abort_stack, ""
                        self._set_faulty(reason)
                        if reason != last_reason:
                            # Once, with a traceback: the stuck actor's stack, else the
                            # exception that ended the pipeline.
                            if stack:
                                log.error("restarting the pipeline: %s\n%s", reason, stack)
                            else:
                                log.error("restarting the pipeline: %s", reason, exc_info=e)
                        else:
                            log.warning("restarting the pipeline again: %s", reason)
                        last_reason = reason
                        self._stop_remote()
                        self.ledger.count("pipeline_restarts")
                        stop.wait(min(RESTART_MAX_DELAY, 2.0 ** restarts))
                        restarts += 1
                        continue
                    if tries >= o.reconnects:
                        raise
                    delay = 2 ** tries
                    tries += 1
                    log.warning("connection to %s lost (%s); restarting in %d s", self.endpoint,
                                e, delay)
                    self._set_faulty(f"connection to {self.endpoint} lost ({e}); "
                                     f"reconnecting in {delay} s")
                    self.ledger.count("reconnects")
                    stop.wait(delay)
        finally:
            beats.stop()
            if control is not None:
                control.close()
            self._stop_remote()
            self.ledger.flush()
            dirmap.close()
            if primary is not None:
                primary.close()
        summary.counters = dict(self.ledger.counters)
        summary.failures = self.ledger.failures()
        summary.seconds = time.monotonic() - t0
        return summary

    def _keep_connection(self) -> bool:
        """True when a restart of the pipeline alone was asked for (actors/control.py)."""
        scope = self.restarts.take()
        if scope is not None:
            log.warning("restart of the %s requested session=%s", scope, self.session)
            self.ledger.count("restarts")
        return scope == "pipeline" and self._remote is not None and not self._remote_closed()

    def _stop_remote(self) -> None:
        if self._remote is not None:
            try:
                self._remote.stop()
            except pykka.ActorDeadError:
                pass
            self._remote = None

    def _wait_for_primary(self, reason: str, stop: threading.Event) -> None:
        """Faulty after a safety stop: look at the primary root every few seconds.

        Returns when it looks right again (a directory, on the recorded device, not
        empty) or when ``stop`` is set; the caller then rebuilds the pipeline, whose
        first step is the full check again (the secondary's side included).
        """
        o = self.options
        path = os.path.abspath(o.primary)
        self._set_faulty(reason)
        log.error("Faulty: %s", reason)
        while not stop.wait(SAFETY_RECHECK):
            try:
                check_root(path, state_dir=self.state_dir, allow_empty=o.allow_empty_primary)
                if o.allow_empty_primary or not primary_is_empty(path):
                    break
            except (SafetyStop, OSError):
                continue
        if not stop.is_set():
            log.warning("primary root %s is back; resuming", path)

    def _watchdog(self, started: list[pykka.ActorRef[Any]], channel: Channel,
                  done: threading.Event, abort: threading.Event) -> None:
        """Thread: an actor dead, or busy with one message longer than ``busy_limit``,
        aborts the pipeline: ``abort`` is set with the reason (and, for a stuck actor, its
        thread's stack) and the channel is closed, which fails every wait on it.  The
        reason is logged by run_live, once."""
        limit = self.options.busy_limit
        while not done.wait(WATCHDOG_INTERVAL):
            now = time.monotonic()  # the clock of Inspectable._ins_current
            dead: list[str] = []
            stuck: list[tuple[str, Any, str, float]] = []
            for ref in list(started):
                actor = ref._actor_weakref()
                name = ref.actor_class.__name__
                if not ref.is_alive():
                    dead.append(name)
                    continue
                current = getattr(actor, "_ins_current", None)
                if current is not None and now - current[1] > limit:
                    stuck.append((name, actor, current[0], now - current[1]))
            if done.is_set():
                return
            if dead:
                why = f"actor {', '.join(dead)} died"
            elif stuck:
                why = "; ".join(f"actor {n} is stuck: busy with {msg} for {age:.0f} s"
                                for n, _a, msg, age in stuck) + f" (limit {limit:g} s)"
                self._abort_stack = f"stack of the stuck {stuck[0][0]}:\n" + \
                    _actor_stack(stuck[0][1])
            else:
                continue
            self._abort_reason = why
            abort.set()
            channel.close()
            return

    def _drive(self, run: Callable[[], None]) -> None:
        """Run a pipeline's driver (``run``) in a thread of its own and wait for it.

        When the watchdog aborts, every wait of the driver on the (closed) channel fails
        at once, but a wait on a stuck actor does not: after ``ABORT_GRACE`` the driver is
        left behind (its stop event is set, its channel closed and its actors told to
        stop, so it can do nothing once the actor returns) and PipelineRestart is raised.
        """
        abort = self._abort
        failed: list[BaseException] = []

        def target() -> None:
            try:
                run()
            except BaseException as e:  # handed to the Supervisor's thread
                failed.append(e)

        t = threading.Thread(target=target, name="pipeline", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.2)
            if abort.is_set() and t.is_alive():
                t.join(ABORT_GRACE)
                if t.is_alive():
                    log.warning("the pipeline's driver still waits on a stuck actor: "
                                "left behind")
                    self.ledger.count("drivers_left_behind")
                    for ref in reversed(list(self._pipeline_actors)):
                        try:
                            ref.stop(block=False)
                        except pykka.ActorDeadError:
                            pass
                    raise PipelineRestart(self._abort_reason)
        if failed:
            raise failed[0]
        if abort.is_set():  # the driver saw the abort between two waits and returned
            raise PipelineRestart(self._abort_reason)

    def _set_faulty(self, reason: str | None) -> None:
        """Why the worker is Faulty (None: it is not), for status while it runs."""
        self.faulty_reason = reason
        st = self._status
        if st is not None:
            st.faulty_reason = reason
            if reason is not None:
                st.status = "Faulty"

    def _remote_closed(self) -> bool:
        assert self._remote is not None
        try:
            channel: Channel = self._remote.proxy().channel().get(timeout=10)
        except Exception:
            return True
        return channel.closed

    def _live(self, primary: PrimaryTree, dirmap: DirMap, state: str, stop: threading.Event,
              summary: Summary) -> None:
        o = self.options
        assert self._remote is not None
        channel: Channel = self._remote.proxy().channel().get(timeout=o.timeout)
        credits = self._credits()
        started: list[pykka.ActorRef[Any]] = []
        jdir = journal_dir(state)
        self._safety(primary, channel)
        watch_done = threading.Event()
        self._pipeline_actors = started
        threading.Thread(target=self._watchdog,
                         args=(started, channel, watch_done, self._abort),
                         name="watchdog", daemon=True).start()
        try:
            syncer_refs = self._start_syncers(channel, primary)
            started += syncer_refs
            batcher_ref = Batcher.start(channel, self.ledger, [r.proxy() for r in syncer_refs],
                                        credits, max_ops=o.max_ops)
            started.append(batcher_ref)
            crawler_ref = Crawler.start(primary, channel, batcher_ref.proxy(), self.ledger,
                                        credits, dirmap=dirmap, timeout=o.timeout,
                                        rules=o.rules())
            started.append(crawler_ref)
            crawler, batcher = crawler_ref.proxy(), batcher_ref.proxy()

            def hybrid() -> int:
                t_start = time.time_ns()
                done: Future[CrawlResult] = Future()
                crawler.begin.defer(done)
                done.result(timeout=None)
                batcher.drain().get(timeout=o.timeout * 6)
                channel.call("end_crawl", {}, timeout=o.timeout)
                return t_start

            mark = marks.read_mark(primary.root_fd, self.session, "entry_stime")
            reader = JournalReader(jdir)
            if (mark is not None and len(dirmap) > 0 and reader.coverage(mark)
                    and not self._secondary_replaced(primary, channel)):
                self._set_mode(HISTORY, summary)
                tail = JournalTail(jdir, since_ts=mark)
            else:
                self._set_mode(HYBRID, summary)
                since = time.time_ns()
                tail = JournalTail(jdir, since_ts=since)
                self.ledger.position_ns = 0  # what the crawl finds may be of any age
                hybrid()
                channel.call("commit", {}, timeout=o.timeout)
                # Marks move past failures: the ledger keeps them (durably) and the
                # Follower retries them one by one.
                self.ledger.flush()
                fault("before_mark")
                for which in ("entry_stime", "stime"):
                    marks.write_mark(primary.root_fd, self.session, which, since)
                if self._status is not None:
                    self._status.synced()
            follower = Follower(crawler=crawler, batcher=batcher, channel=channel,
                                ledger=self.ledger, dirmap=dirmap, tail=tail,
                                root_fd=primary.root_fd, session=self.session, hybrid=hybrid,
                                on_mode=lambda m: self._set_mode(m, summary),
                                timeout=o.timeout, paused=self._paused,
                                idle_mark_lag=None if self._status is None else 1.0,
                                safety=lambda: self._safety(primary, channel))
            self.follower = follower  # read by the control socket (pause acknowledged)
            if self._status is not None:
                self._status.connected(follower, batcher_ref, syncer_refs)
            last_beat = [0.0]

            def on_round() -> None:
                if self.faulty_reason is not None:
                    self._set_faulty(None)
                if self._status is not None:
                    self._status.round_done(follower)
                on_idle()

            def on_idle() -> None:
                if channel.closed:
                    # The secondary host or its ssh died while nothing was to be sent:
                    # a call on the dead channel raises ConnectionLost with the reason,
                    # and run_live reconnects (nothing else would notice until a change).
                    channel.call("ping", {}, timeout=o.timeout)
                if summary.counters.get("mode") != CHANGELOG and tail_idle(tail):
                    self._set_mode(CHANGELOG, summary)
                now = time.monotonic()
                if now - last_beat[0] > 10:
                    heartbeat(state)
                    last_beat[0] = now

            follower.follow(stop, on_round, on_idle)
            tail.close()
        finally:
            watch_done.set()
            for ref in reversed(started):
                ref.stop(block=True, timeout=o.timeout)

    def _secondary_replaced(self, primary: PrimaryTree, channel: Channel) -> bool:
        """True when the secondary root is empty while the primary's is not.

        The marks then describe another replica (a root that was removed or not mounted,
        and created again empty by the secondary host): replaying the journal from them
        would leave everything older missing, so the caller walks the tree instead.
        """
        reply = channel.call("list_dir", {"gfid": ROOT_GFID}, timeout=self.options.timeout)
        if reply["entries"] or primary_is_empty(os.path.abspath(self.options.primary)):
            return False
        log.warning("secondary root %s is empty but the primary's is not: the marks do not "
                    "describe it; walking the tree (%s)", self.endpoint, HYBRID)
        self.ledger.count("secondary_replaced")
        return True

    def _set_mode(self, mode: str, summary: Summary) -> None:
        if self.crawl_mode != mode:
            log.warning("crawl=%s session=%s", mode, self.session)
        self.crawl_mode = mode
        if self._status is not None:
            self._status.set_mode(mode, dict(self.ledger.counters))

    crawl_mode = ""
    follower: Follower | None = None
    _abort_stack = ""
    _pipeline_actors: list[pykka.ActorRef[Any]] = []
    _status: Any = None
    _paused: Callable[[], bool] | None = None


def tail_idle(tail: JournalTail) -> bool:
    """True once the tail has caught up with the journal (history replayed)."""
    return tail.caught_up


class _PipelineStop(RoundStop):
    """The Follower's stop: the worker's stop, a restart request, or this pipeline's abort."""

    def __init__(self, stop: threading.Event, restarts: Restarts,
                 abort: threading.Event) -> None:
        super().__init__(stop, restarts)
        self._aborted = abort

    def is_set(self) -> bool:
        return self._aborted.is_set() or super().is_set()


def _actor_stack(actor: Any) -> str:
    """The current stack of the thread running ``actor`` (a pykka ThreadingActor)."""
    for frame in sys._current_frames().values():
        f: FrameType | None = frame
        while f is not None:
            if f.f_code.co_name == "_actor_loop" and f.f_locals.get("self") is actor:
                return "".join(traceback.format_stack(frame))
            f = f.f_back
    return "(its thread was not found)\n"
