"""Live replication: History Crawl, then Changelog Crawl, with Hybrid Crawl for gaps.

A journal record means "re-check this": ``E``/``R`` name directories whose entries
changed, ``D``/``M`` name objects whose data or attributes changed.  Events merge and
lose their order in the kernel, so records are not replayed as operations: each round
turns the new records into a set of directories to re-check against the current state
of the primary (the same reconciler as the hybrid crawl, one directory deep, plus any
subtree that is new on the secondary) and a set of files whose data must be compared.
A replay of records already handled is therefore a no-op.

Marks: after a round's ops and data are acknowledged and the secondary has made them
durable (``commit``, at most once per ``commit_interval``), entry_stime and stime move to
the time of the last record handled.  A restart replays from there (History Crawl)
when the journal covers the gap, and walks the tree (Hybrid Crawl) when it does not
(first start, recorder down, queue overflow).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from actors.crawler import CrawlResult
from actors.ledger import Ledger
from fsops import marks
from fsops.dirmap import DirMap
from fsops.journal import DATA, ENTRY, META, OVERFLOW, RENAME, START, STOP, Record

log = logging.getLogger("georep.live")

HISTORY, HYBRID, CHANGELOG = "History Crawl", "Hybrid Crawl", "Changelog Crawl"

#: A directory the map cannot place is retried this many rounds before a hybrid crawl.
UNRESOLVED_ROUNDS = 5


@dataclass
class Work:
    """What one round of records asks for."""

    dirs: set[bytes] = field(default_factory=set)
    force: set[bytes] = field(default_factory=set)
    last_ts: int = 0
    gap: str | None = None  # why history is broken at this point (overflow, restart)
    records: int = 0


def digest(records: list[Record], dirmap: DirMap, work: Work) -> None:
    """Fold records into ``work``; renames of directories update the map first."""
    for r in records:
        work.records += 1
        work.last_ts = max(work.last_ts, r.ts)
        if r.kind == ENTRY:
            if r.pgfid:
                work.dirs.add(r.pgfid)
        elif r.kind == RENAME:
            if r.pgfid:
                work.dirs.add(r.pgfid)
            if r.npgfid:
                work.dirs.add(r.npgfid)
            if r.gfid and r.npgfid and r.nname and dirmap.get(r.gfid) is not None:
                dirmap.set(r.gfid, r.npgfid, r.nname)
        elif r.kind in (DATA, META):
            if r.pgfid:
                # A file (or a directory named in its parent): re-check the parent; data
                # is compared even if size and mtime did not move.
                work.dirs.add(r.pgfid)
                if r.kind == DATA and r.gfid:
                    work.force.add(r.gfid)
            elif r.gfid:
                # An event on a directory itself: re-check it (its own meta included).  A
                # directory the map cannot place is retried, then handled by a hybrid crawl.
                work.dirs.add(r.gfid)
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
                 idle: float = 0.03, max_wait: float = 0.1, max_records: int = 20000) -> None:
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

    def _collect(self, stop: threading.Event) -> Work:
        """Wait for records, then gather until they pause (``idle``) or ``max_wait``."""
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
            time.sleep(0.005 if first is not None else 0.01)
        return work

    def round(self, work: Work) -> None:
        """Re-check what ``work`` names, then move the marks."""
        if work.gap:
            log.warning("journal gap (%s): %s", work.gap, HYBRID)
            self.on_mode(HYBRID)
            self._pending_mark = max(self._pending_mark, self.hybrid())
            self.on_mode(CHANGELOG)
            self.unresolved.clear()
            return
        dirs = set(work.dirs) | set(self.unresolved)
        if dirs or work.force:
            done: Future[CrawlResult] = Future()
            self.crawler.recheck.defer(sorted(dirs), frozenset(work.force), done)
            result = done.result(timeout=self.timeout)
            self.batcher.drain().get(timeout=self.timeout)
            self.channel.call("end_crawl", {}, timeout=self.timeout)
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

    def _maybe_commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._pending_mark or self.unresolved or self.ledger.failures():
            return
        if not force and now - self._last_commit < self.commit_interval:
            return
        self.channel.call("commit", {}, timeout=self.timeout)
        for which in ("entry_stime", "stime"):
            marks.write_mark(self.root_fd, self.session, which, self._pending_mark)
        self._last_commit = now
        self._pending_mark = 0

    def follow(self, stop: threading.Event, on_round: Callable[[], None] | None = None) -> None:
        """Rounds until ``stop`` is set; the last round is made durable before returning."""
        while not stop.is_set():
            work = self._collect(stop)
            self.round(work)
            if on_round is not None:
                on_round()
        self._maybe_commit(force=True)
