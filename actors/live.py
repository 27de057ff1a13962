"""Live replication: History Crawl, then Changelog Crawl, with Hybrid Crawl for gaps.

A journal record means "re-check this": ``E``/``R`` name entries (directory gfid and
name) that changed, ``D``/``M`` name objects whose data or attributes changed.  Events
merge and lose their order in the kernel, so records are not replayed as operations:
each round turns the new records into the names to re-check in each directory, against
the current state of the primary (the same reconciler as the hybrid crawl, given only
those names on both sides, plus any subtree that is new on the secondary) and a set of
files whose data must be compared.  A replay of records already handled is therefore
a no-op.  A round costs what its records name, not the size of the directories they
are in.

Marks: after a round's ops and data are acknowledged and the secondary has made them
durable (``commit``, at most once per ``commit_interval``), entry_stime and stime move to
the time of the last record handled.  A restart replays from there (History Crawl)
when the journal covers the gap, and walks the tree (Hybrid Crawl) when it does not
(first start, recorder down, queue overflow).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from actors.crawler import CrawlResult
from actors.faults import fault
from actors.ledger import Failure, Ledger
from fsops import gfid as gfids
from fsops import marks
from fsops.constants import ROOT_GFID
from fsops.dirmap import DirMap
from fsops.journal import DATA, ENTRY, META, OVERFLOW, RENAME, START, STOP, Record
from fsops.resolve import open_beneath

log = logging.getLogger("georep.live")

HISTORY, HYBRID, CHANGELOG = "History Crawl", "Hybrid Crawl", "Changelog Crawl"

#: A directory the map cannot place is retried this many rounds before a hybrid crawl.
UNRESOLVED_ROUNDS = 5
#: While idle, the safety stop (fsops/safety.py) is checked this often (seconds).
SAFETY_INTERVAL = 3.0
#: While idle, the ledger is asked this often whether a failed item is due for a retry.
RETRY_POLL = 0.25
#: Past this many names in one directory in one round, the whole directory is re-listed.
NAMES_MAX = 4096
#: A directory re-checked by name is re-listed whole once it has had no record for this
#: long (the consistency sweep: see docs/design.md, "Live rounds").
SWEEP_AFTER = 1.0
#: At most this many directories wait for their sweep; past it the oldest go at once.
SWEEP_MAX = 100_000


@dataclass
class Work:
    """What one round of records asks for."""

    #: Directories to re-check: gfid -> the names to compare (an empty set: only the
    #: directory's own meta), or None for every entry.
    dirs: dict[bytes, set[bytes] | None] = field(default_factory=dict)
    force: set[bytes] = field(default_factory=set)
    #: Changed files: gfid -> file handle, for those the named re-checks do not meet.
    linked: dict[bytes, bytes] = field(default_factory=dict)
    last_ts: int = 0
    gap: str | None = None  # why history is broken at this point (overflow, restart)
    records: int = 0

    def name(self, pgfid: bytes, name: bytes | None) -> None:
        """Re-check ``name`` in directory ``pgfid`` (None: the whole directory)."""
        if pgfid in self.dirs:
            names = self.dirs[pgfid]
            if names is None:
                return
            if name is None or len(names) >= NAMES_MAX:
                self.dirs[pgfid] = None
            else:
                names.add(name)
        else:
            self.dirs[pgfid] = None if name is None else {name}

    def whole(self, gfid: bytes) -> None:
        """Re-check every entry of directory ``gfid``."""
        self.dirs[gfid] = None

    def own(self, gfid: bytes) -> None:
        """Re-check the directory ``gfid`` itself (its own meta)."""
        self.dirs.setdefault(gfid, set())

    def targets(self) -> list[tuple[bytes, list[bytes] | None]]:
        """(gfid, sorted names or None), sorted by gfid, for the crawler's re-check."""
        return [(g, None if n is None else sorted(n)) for g, n in sorted(self.dirs.items())]


def digest(records: list[Record], dirmap: DirMap, work: Work) -> None:
    """Fold records into ``work``; renames of directories update the map first."""
    for r in records:
        work.records += 1
        work.last_ts = max(work.last_ts, r.ts)
        if r.kind == ENTRY:
            if r.pgfid:
                work.name(r.pgfid, r.name or None)
        elif r.kind == RENAME:
            if r.pgfid:
                work.name(r.pgfid, r.name or None)
            if r.npgfid:
                work.name(r.npgfid, r.nname or None)
            if r.gfid and r.npgfid and r.nname and dirmap.get(r.gfid) is not None:
                dirmap.set(r.gfid, r.npgfid, r.nname)
        elif r.kind in (DATA, META):
            if r.pgfid:
                # A file (or a directory named in its parent): re-check the parent; data
                # is compared even if size and mtime did not move.
                work.name(r.pgfid, r.name or None)
                if r.kind == DATA and r.gfid:
                    work.force.add(r.gfid)
                if r.handle and r.gfid:
                    work.linked[r.gfid] = r.handle
            elif r.gfid:
                # An event on a directory itself: re-check its own meta.  A directory the
                # map cannot place is retried, then handled by a hybrid crawl.
                work.own(r.gfid)
        elif r.kind == OVERFLOW:
            work.gap = "the recorder's event queue overflowed"
        elif r.kind in (START, STOP):
            work.gap = work.gap or "the recorder restarted"


class Follower:
    """Runs the live rounds of one worker; its caller owns the actors it drives."""

    def __init__(self, *, crawler: Any, batcher: Any, channel: Any, ledger: Ledger,
                 dirmap: DirMap, tail: Any, root_fd: int, session: str,
                 hybrid: Callable[[], int], on_mode: Callable[[str], None],
                 timeout: float = 600.0, commit_interval: float = 1.0,
                 idle: float = 0.03, max_wait: float = 0.1, max_records: int = 20000,
                 paused: Callable[[], bool] | None = None,
                 idle_mark_lag: float | None = None, idle_mark_interval: float = 2.0,
                 safety: Callable[[], None] | None = None) -> None:
        self.crawler = crawler
        self.batcher = batcher
        self.channel = channel
        self.ledger = ledger
        self.dirmap = dirmap
        self.tail = tail
        self.root_fd = root_fd
        self.session = session
        self.hybrid = hybrid
        self.on_mode = on_mode
        self.timeout = timeout
        self.commit_interval = commit_interval
        self.idle = idle
        self.max_wait = max_wait
        self.max_records = max_records
        self.unresolved: dict[bytes, int] = {}
        self._last_commit = 0.0
        self._pending_mark = 0
        #: Asked between rounds; while True, no round runs (the connection stays up).
        self.paused = paused
        #: True while the follower honours a pause.
        self.is_paused = False
        #: The round being applied (for status: its records are pending), and the last one.
        self.current: Work | None = None
        self.last_work: Work | None = None
        #: When set: while the journal is caught up and everything handled is durable,
        #: the marks advance to "now - idle_mark_lag" every ``idle_mark_interval`` s, so
        #: a checkpoint completes on an idle brick.  The lag covers records the recorder
        #: has read but not yet appended (its coalescing window is 20 ms).
        self.idle_mark_lag = idle_mark_lag
        self.idle_mark_interval = idle_mark_interval
        self._last_idle_mark = 0.0
        self._last_pause_check = 0.0
        #: Raises fsops.safety.SafetyStop when the primary root looks unmounted or emptied.
        self.safety = safety
        self._last_safety = 0.0
        self._last_retry_poll = 0.0
        #: Directories re-checked by name since their last whole listing: gfid -> when
        #: a record last named them (monotonic).
        self.sweep: dict[bytes, float] = {}

    def _collect(self, stop: threading.Event,
                 on_idle: Callable[[], None] | None = None) -> Work:
        """Wait for records, then gather until they pause (``idle``) or ``max_wait``.

        ``on_idle`` is called while no record comes (the worker's heartbeat and mode).
        """
        work = Work()
        first: float | None = None
        last_new = time.monotonic()
        while not stop.is_set():
            recs = self.tail.read_new(self.max_records - work.records)
            now = time.monotonic()
            if recs:
                digest(recs, self.dirmap, work)
                last_new = now
                if first is None:
                    first = now
            if first is not None and (now - last_new >= self.idle or now - first >= self.max_wait
                                      or work.records >= self.max_records or work.gap):
                break
            if first is None and self._pending_mark and now - self._last_commit >= \
                    self.commit_interval:
                break  # nothing new: still make the last round durable
            if first is None and on_idle is not None:
                on_idle()
            if first is None and not recs and self.tail.caught_up:
                self._idle_mark(now)
            if first is None and self._sweep_due(now):
                break  # quiet directories are due for their whole re-listing
            if first is None and now - self._last_retry_poll >= RETRY_POLL:
                self._last_retry_poll = now
                due = self.ledger.next_due()
                if due is not None and due <= time.time():
                    break  # a failed item is due for its retry
            if first is None and self.safety is not None and \
                    now - self._last_safety >= SAFETY_INTERVAL:
                self._last_safety = now
                self.safety()
            if first is None and self.paused is not None and now - self._last_pause_check > 0.1:
                self._last_pause_check = now
                if self.paused():
                    break
            time.sleep(0.005 if first is not None else 0.01)
        return work

    def round(self, work: Work) -> None:
        """Re-check what ``work`` names (and the failed items due for a retry), then move
        the marks."""
        if self.safety is not None:
            self._last_safety = time.monotonic()
            self.safety()
        self.ledger.position_ns = marks.read_mark(self.root_fd, self.session, "stime") or 0
        if work.gap:
            log.warning("journal gap (%s): %s", work.gap, HYBRID)
            self.on_mode(HYBRID)
            self._pending_mark = max(self._pending_mark, self.hybrid())
            self.on_mode(CHANGELOG)
            self.unresolved.clear()
            self.sweep.clear()  # the walk listed everything
            return
        for g in self.unresolved:
            work.whole(g)  # looked for again: compared whole once it is found
        self._plan_sweep(work)
        force = set(work.force)
        retry_only = self._take_retries(work, force)
        if work.dirs or force:
            done: Future[CrawlResult] = Future()
            self.crawler.recheck.defer(work.targets(), frozenset(force), done,
                                       list(work.linked.items()))
            result = done.result(timeout=self.timeout)
            self.batcher.drain().get(timeout=self.timeout)
            self.channel.call("end_crawl", {}, timeout=self.timeout)
            for g, items in retry_only.items():
                if g in result.unresolved:
                    result.unresolved.remove(g)
                    for f in items:
                        self.ledger.drop(f, "its directory is no longer on the primary")
            # Taken-out items that did not fail again are done.
            if self.ledger.settle():
                log.info("failed items cleared after a retry")
            retry = {g: self.unresolved.get(g, 0) + 1 for g in result.unresolved}
            self.unresolved = {g: n for g, n in retry.items() if n <= UNRESOLVED_ROUNDS}
            if len(retry) != len(self.unresolved):
                log.warning("directories the journal names cannot be found: %s", HYBRID)
                self.round(Work(gap="directories named by the journal could not be placed"))
                return
        if work.last_ts:
            self._pending_mark = max(self._pending_mark, work.last_ts)
        self.ledger.count("live_rounds")
        self.ledger.count("live_records", work.records)
        self._maybe_commit()

    def _sweep_due(self, now: float) -> bool:
        return bool(self.sweep) and (len(self.sweep) > SWEEP_MAX or
                                     now - min(self.sweep.values()) >= SWEEP_AFTER)

    def _plan_sweep(self, work: Work) -> None:
        """Directories named in this round wait for a sweep; quiet ones get it now.

        A named re-check is exact when the journal names every entry that changed; the
        sweep, one whole listing of each touched directory once it is quiet, is the
        safety net for anything the names missed (it costs one listing per quiet
        directory, not one per round).
        """
        now = time.monotonic()
        due = [g for g, t in self.sweep.items()
               if now - t >= SWEEP_AFTER and g not in work.dirs]
        if len(self.sweep) > SWEEP_MAX:
            due += sorted(self.sweep, key=self.sweep.__getitem__)[:len(self.sweep) - SWEEP_MAX]
        for g in due:
            self.sweep.pop(g, None)
            work.whole(g)
        for g, names in work.dirs.items():
            if names is None:
                self.sweep.pop(g, None)  # listed whole in this round
            elif g not in due:
                self.sweep[g] = now
        if due:
            self.ledger.count("live_sweeps", len(due))

    def _take_retries(self, work: Work, force: set[bytes]) -> dict[bytes, list[Failure]]:
        """Failed items due for a retry: their directories join this round's re-checks.

        One item at a time (its directory, resolved through the directory map by the
        failure's pgfid, else by its path), never a whole batch nor a hybrid crawl.
        Returns the directories re-checked only for retries, with their items.
        """
        only: dict[bytes, list[Failure]] = {}
        for f in self.ledger.take_due():
            d = self._retry_dir(f)
            if d is None:
                self.ledger.drop(f, "its directory is no longer on the primary")
                continue
            if d not in work.dirs:
                only.setdefault(d, []).append(f)
            elif d in only:
                only[d].append(f)
            work.whole(d)  # the failure's name may be stale (a path): compare them all
            if f.gfid and f.kind == "data":
                force.add(f.gfid)
            if f.gfid and f.gfid != d and (f.gfid == ROOT_GFID
                                           or self.dirmap.get(f.gfid) is not None):
                work.own(f.gfid)  # a directory's own meta: re-check the directory itself
        if only:
            self.ledger.count("failure_retries", sum(len(v) for v in only.values()))
        return only

    def _retry_dir(self, f: Failure) -> bytes | None:
        """The directory whose re-check retries ``f``, or None when it is gone."""
        if f.pgfid is not None and (f.pgfid == ROOT_GFID or self.dirmap.get(f.pgfid)):
            return f.pgfid
        parent = f.path.rpartition(b"/")[0] if b"/" in f.path else b""
        if not parent:
            return ROOT_GFID
        try:
            fd = open_beneath(self.root_fd, parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return f.pgfid if f.pgfid is not None and self.dirmap.get(f.pgfid) else None
        try:
            return gfids.read_gfid(fd, os.fstat(fd).st_ino)
        finally:
            os.close(fd)

    def _idle_mark(self, now: float) -> None:
        """Nothing is pending and the journal is caught up: move the marks to now - lag.

        Only when every round handled is already durable (no pending mark), with no
        failure and nothing unresolved; no ``commit`` is needed since nothing was applied
        since the last one.
        """
        if (self.idle_mark_lag is None or self._pending_mark or self.unresolved
                or now - self._last_idle_mark < self.idle_mark_interval):
            return
        self._last_idle_mark = now
        ns = time.time_ns() - int(self.idle_mark_lag * 1e9)
        cur = marks.read_mark(self.root_fd, self.session, "stime") or 0
        if ns > cur:
            self.ledger.flush()
            fault("before_mark")
            for which in ("entry_stime", "stime"):
                marks.write_mark(self.root_fd, self.session, which, ns)

    def _maybe_commit(self, force: bool = False) -> None:
        now = time.monotonic()
        # Marks move past failed items (one bad file must not hold back the rest): the
        # ledger keeps them, durably, before any mark passes them.
        if not self._pending_mark or self.unresolved:
            return
        if not force and now - self._last_commit < self.commit_interval:
            return
        self.channel.call("commit", {}, timeout=self.timeout)
        self.ledger.flush()
        fault("before_mark")
        for which in ("entry_stime", "stime"):
            marks.write_mark(self.root_fd, self.session, which, self._pending_mark)
        self._last_commit = now
        self._pending_mark = 0

    def follow(self, stop: threading.Event, on_round: Callable[[], None] | None = None,
               on_idle: Callable[[], None] | None = None) -> None:
        """Rounds until ``stop`` is set; the last round is made durable before returning.

        ``on_round`` runs after each round, ``on_idle`` while waiting for records (an idle
        brick must still heartbeat the recorder and report the Changelog Crawl).
        """
        while not stop.is_set():
            if self.paused is not None and self.paused():
                if not self.is_paused:
                    self._maybe_commit(force=True)
                    log.warning("paused session=%s", self.session)
                self.is_paused = True
                if on_round is not None:
                    on_round()
                stop.wait(0.2)
                continue
            if self.is_paused:
                self.is_paused = False
                log.warning("resumed session=%s", self.session)
            work = self._collect(stop, on_idle)
            self.current = work
            self.round(work)
            self.current, self.last_work = None, work
            if on_round is not None:
                on_round()
        self._maybe_commit(force=True)
