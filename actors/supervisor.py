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

import hashlib
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.batcher import Batcher
from actors.crawler import Crawler, CrawlResult
from actors.ledger import Failure, Ledger
from actors.live import CHANGELOG, HISTORY, HYBRID, Follower
from actors.recorder_host import ensure_recorder, heartbeat, journal_dir
from actors.remote import ConnectError, RemoteProxy
from actors.syncer import Syncer
from fsops import marks
from fsops.dirmap import DirMap, default_state_root
from fsops.journal import JournalReader
from fsops.journal_tail import JournalTail
from fsops.primary import PrimaryTree
from transport import Channel
from transport.endpoint import Endpoint, parse_secondary

log = logging.getLogger("georep.supervisor")

#: Reconnect attempts after the connection drops in a pass (waits 1, 2, 4, 8, 16 s).
RECONNECT_TRIES = 5


@dataclass
class SyncOptions:
    """What one ``sync`` run needs to know."""

    primary: str
    secondary: str
    jobs: int = 2
    max_ops: int = 1024
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


class Supervisor(pykka.ThreadingActor):
    """Owns a worker's actors and runs sync passes."""

    def __init__(self, options: SyncOptions) -> None:
        super().__init__()
        self.options = options
        self.endpoint = parse_secondary(options.secondary)
        self.session = options.session or session_id(options.primary, self.endpoint)
        self.ledger = Ledger()
        self._remote: pykka.ActorRef[Any] | None = None

    def run_once(self) -> Summary:
        """Make the secondary equal to the primary now; see the module docstring."""
        o = self.options
        t0 = time.monotonic()
        summary = Summary(o.primary, str(self.endpoint))
        primary = PrimaryTree(os.fsencode(o.primary))
        try:
            self._connect()
            transfer: dict[str, int] = {}
            for n in range(1 + o.retries):
                if n:
                    log.info("retrying failed items pass=%d failures=%d", n + 1,
                             len(self.ledger.failures()))
                    self.ledger.clear_failures()
                started_ns, moved = self._pass_reconnecting(primary)
                for k, v in moved.items():
                    transfer[k] = transfer.get(k, 0) + v
                summary.passes = n + 1
                if started_ns is not None:
                    self._write_marks(primary, started_ns, summary)
                    break
            summary.transfer = transfer
            summary.counters = dict(self.ledger.counters)
            summary.failures = self.ledger.failures()
        finally:
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
        identity = {"session": self.session, "primary": os.path.abspath(o.primary),
                    "host": socket.gethostname(), "force": o.force}
        self._remote = RemoteProxy.start(self.endpoint, ssh_command=o.ssh_command,
                                         remote_command=o.remote_command, identity=identity)
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
            started_ns = time.time_ns()
            try:
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
        credits = threading.Semaphore(64)
        done: Future[CrawlResult] = Future()
        started: list[pykka.ActorRef[Any]] = []
        try:
            syncer_refs = [Syncer.start(channel, primary, self.ledger, timeout=o.timeout)
                           for _ in range(max(1, o.jobs))]
            started += syncer_refs
            syncers = [r.proxy() for r in syncer_refs]
            batcher_ref = Batcher.start(channel, self.ledger, syncers, credits, max_ops=o.max_ops)
            started.append(batcher_ref)
            crawler_ref = Crawler.start(primary, channel, batcher_ref.proxy(), self.ledger,
                                        credits, timeout=o.timeout)
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

    def _write_marks(self, primary: PrimaryTree, started_ns: int, summary: Summary) -> None:
        for which in ("entry_stime", "stime"):
            marks.write_mark(primary.root_fd, self.session, which, started_ns)
            summary.marks[which] = started_ns

    # -- continuous mode ---------------------------------------------------------------------

    def state_path(self) -> str:
        """The session's state directory (journal, directory map, logs)."""
        root = self.options.state_dir or default_state_root()
        return os.path.join(root, "sessions", self.session)

    def run_live(self, stop: threading.Event) -> Summary:
        """Replicate continuously until ``stop`` is set; see actors/live.py.

        The recorder daemon is started first (or found running), so nothing that changes
        from now on escapes the journal.  A dropped connection restarts the whole worker
        pipeline after a backoff; it resumes from the marks (History Crawl).
        """
        o = self.options
        t0 = time.monotonic()
        summary = Summary(o.primary, str(self.endpoint))
        state = self.state_path()
        primary = PrimaryTree(os.fsencode(o.primary))
        ensure_recorder(os.path.abspath(o.primary), state, linger=o.recorder_linger)
        dirmap = DirMap(os.path.join(state, "dirmap.db"))
        tries = 0
        try:
            while not stop.is_set():
                try:
                    self._connect()
                    tries = 0
                    self._live(primary, dirmap, state, stop, summary)
                except ConnectError:
                    raise
                except Exception as e:
                    channel_dead = self._remote is None or self._remote_closed()
                    if not channel_dead or tries >= o.reconnects:
                        raise
                    delay = 2 ** tries
                    tries += 1
                    log.warning("connection to %s lost (%s); restarting in %d s", self.endpoint,
                                e, delay)
                    self.ledger.count("reconnects")
                    stop.wait(delay)
        finally:
            if self._remote is not None:
                self._remote.stop()
                self._remote = None
            dirmap.close()
            primary.close()
        summary.counters = dict(self.ledger.counters)
        summary.failures = self.ledger.failures()
        summary.seconds = time.monotonic() - t0
        return summary

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
        credits = threading.Semaphore(64)
        started: list[pykka.ActorRef[Any]] = []
        jdir = journal_dir(state)
        try:
            syncer_refs = [Syncer.start(channel, primary, self.ledger, timeout=o.timeout)
                           for _ in range(max(1, o.jobs))]
            started += syncer_refs
            batcher_ref = Batcher.start(channel, self.ledger, [r.proxy() for r in syncer_refs],
                                        credits, max_ops=o.max_ops)
            started.append(batcher_ref)
            crawler_ref = Crawler.start(primary, channel, batcher_ref.proxy(), self.ledger,
                                        credits, dirmap=dirmap, timeout=o.timeout)
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
            if mark is not None and len(dirmap) > 0 and reader.coverage(mark):
                self._set_mode(HISTORY, summary)
                tail = JournalTail(jdir, since_ts=mark)
            else:
                self._set_mode(HYBRID, summary)
                since = time.time_ns()
                tail = JournalTail(jdir, since_ts=since)
                hybrid()
                channel.call("commit", {}, timeout=o.timeout)
                if not self.ledger.failures():
                    for which in ("entry_stime", "stime"):
                        marks.write_mark(primary.root_fd, self.session, which, since)
            follower = Follower(crawler=crawler, batcher=batcher, channel=channel,
                                ledger=self.ledger, dirmap=dirmap, tail=tail,
                                root_fd=primary.root_fd, session=self.session, hybrid=hybrid,
                                on_mode=lambda m: self._set_mode(m, summary),
                                timeout=o.timeout)
            last_beat = [0.0]

            def on_round() -> None:
                if summary.counters.get("mode") != CHANGELOG and tail_idle(tail):
                    self._set_mode(CHANGELOG, summary)
                now = time.monotonic()
                if now - last_beat[0] > 10:
                    heartbeat(state)
                    last_beat[0] = now

            follower.follow(stop, on_round)
            tail.close()
        finally:
            for ref in reversed(started):
                ref.stop(block=True, timeout=o.timeout)

    def _set_mode(self, mode: str, summary: Summary) -> None:
        if self.crawl_mode != mode:
            log.warning("crawl=%s session=%s", mode, self.session)
        self.crawl_mode = mode

    crawl_mode = ""


def tail_idle(tail: JournalTail) -> bool:
    """True once the tail has caught up with the journal (history replayed)."""
    return tail.caught_up
