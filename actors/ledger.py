"""Per-item failures and counters, shared by the actors of one worker.

Failures are values collected here, never exceptions that kill a batch: one bad file
must not stop the rest, and it must not be forgotten either.

With a ``path`` the ledger is durable: ``failures.json`` in the worker's state
directory, rewritten atomically (temp file, fsync, rename, fsync of the directory) by
:meth:`Ledger.flush`.  The callers flush before they move a mark, so a mark never
passes a failure that is only in memory: after a crash the failure is loaded again
and retried (see actors/live.py).  A failure is keyed by (kind, path); a repeat bumps
its attempts and pushes its next retry back (1 s doubling to 5 min).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger("georep.ledger")

#: First retry delay and its ceiling (seconds); the delay doubles with each attempt.
RETRY_FIRST, RETRY_MAX = 1.0, 300.0
FILE_NAME = "failures.json"


def backoff(attempts: int) -> float:
    """Delay before the next retry of an item that failed ``attempts`` times."""
    return min(RETRY_MAX, RETRY_FIRST * 2 ** max(0, min(attempts - 1, 30)))


@dataclass(slots=True)
class Failure:
    """One operation that did not succeed."""

    kind: str  # "entry", "meta" or "data"
    op: str
    path: bytes
    gfid: bytes | None
    errno: int | None
    message: str
    attempts: int = 1
    first_seen: float = 0.0
    last_seen: float = 0.0
    #: The directory whose re-check retries this item (the parent of ``path``, or the
    #: directory itself for its own meta); None: resolve ``path``'s parent instead.
    pgfid: bytes | None = None
    next_retry: float = 0.0
    #: The mark (ns) in force when the item first failed: changes older than that were
    #: already handled, so only a checkpoint later than it is held back by this failure.
    since_ns: int = 0

    def line(self) -> str:
        """One line a person can act on."""
        err = f" [errno {self.errno}]" if self.errno else ""
        return f"{self.kind} {self.op} {os.fsdecode(self.path)!r}: {self.message}{err}"

    def to_json(self) -> dict[str, object]:
        """The durable form (path as a surrogate-escaped str: names are bytes)."""
        return {"kind": self.kind, "op": self.op, "path": os.fsdecode(self.path),
                "gfid": self.gfid.hex() if self.gfid else None,
                "pgfid": self.pgfid.hex() if self.pgfid else None,
                "errno": self.errno, "message": self.message, "attempts": self.attempts,
                "first_seen": self.first_seen, "last_seen": self.last_seen,
                "next_retry": self.next_retry, "since_ns": self.since_ns}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Failure:
        """Inverse of :meth:`to_json`."""
        def hexb(v: object) -> bytes | None:
            return bytes.fromhex(v) if isinstance(v, str) and v else None

        def num(v: object) -> float:
            return float(v) if isinstance(v, int | float) else 0.0

        err = d.get("errno")
        return cls(str(d["kind"]), str(d["op"]), os.fsencode(str(d["path"])), hexb(d.get("gfid")),
                   err if isinstance(err, int) else None, str(d.get("message", "")),
                   int(num(d.get("attempts", 1))), num(d.get("first_seen")),
                   num(d.get("last_seen")), hexb(d.get("pgfid")), num(d.get("next_retry")),
                   int(num(d.get("since_ns"))))


class Ledger:
    """Thread-safe failure list and counters of one worker (durable with ``path``)."""

    def __init__(self, path: str | None = None) -> None:
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, bytes], Failure] = {}
        #: Failures taken out for a retry: a repeat continues their history.
        self._retrying: dict[tuple[str, bytes], Failure] = {}
        self.counters: Counter[str] = Counter()
        self.path = path
        self._dirty = False
        #: Set by the caller to the mark in force for the work being done (see Failure).
        self.position_ns = 0
        if path is not None:
            self._load()

    # -- durability ------------------------------------------------------------------------

    def _load(self) -> None:
        assert self.path is not None
        try:
            with open(self.path, encoding="utf-8") as fh:
                rows = json.load(fh).get("failures", [])
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError) as e:
            # Unreadable: keep it for a person to look at, and start a new one.
            log.error("failure ledger %s is unreadable (%s); kept as %s.bad", self.path, e,
                      self.path)
            os.replace(self.path, self.path + ".bad")
            return
        for row in rows:
            try:
                f = Failure.from_json(row)
            except (KeyError, TypeError, ValueError):
                continue
            self._failures[(f.kind, f.path)] = f
        if self._failures:
            log.warning("failure ledger: %d item(s) from an earlier run will be retried",
                        len(self._failures))

    def flush(self) -> None:
        """Write the failures durably if they changed (call before moving a mark)."""
        if self.path is None:
            return
        with self._lock:
            if not self._dirty:
                return
            rows = [f.to_json() for f in self._failures.values()]
            rows += [f.to_json() for k, f in self._retrying.items() if k not in self._failures]
            self._dirty = False
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                json.dump({"version": 1, "failures": rows}, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            with self._lock:
                self._dirty = True
            raise

    # -- recording ---------------------------------------------------------------------------

    def fail(self, kind: str, op: str, path: bytes, gfid: bytes | None,
             errno: int | None, message: str, *, pgfid: bytes | None = None) -> None:
        """Record a failure (a repeat of the same item bumps its attempts)."""
        now = time.time()
        key = (kind, path)
        with self._lock:
            old = self._failures.get(key) or self._retrying.pop(key, None)
            if old is not None:
                if key in self._failures and old.last_seen >= self._pass_started:
                    # The same item failing twice in one pass is one attempt.
                    old.errno, old.message, old.op = errno, message, op
                else:
                    old.attempts += 1
                    old.last_seen = now
                    old.errno, old.message, old.op = errno, message, op
                old.gfid = gfid or old.gfid
                old.pgfid = pgfid or old.pgfid
                old.next_retry = now + backoff(old.attempts)
                self._failures[key] = old
            else:
                self._failures[key] = Failure(kind, op, path, gfid, errno, message, 1, now, now,
                                              pgfid, now + backoff(1), self.position_ns)
            self._dirty = True

    _pass_started = 0.0

    def count(self, name: str, n: int = 1) -> None:
        """Add to a named counter."""
        with self._lock:
            self.counters[name] += n

    def add_counts(self, counts: dict[str, int]) -> None:
        """Add several counters at once."""
        with self._lock:
            self.counters.update(counts)

    def failures(self) -> list[Failure]:
        """A snapshot of the current failures."""
        with self._lock:
            return list(self._failures.values())

    def clear_failures(self) -> list[Failure]:
        """Take the failures out before a pass that re-derives all of them (a full crawl).

        A failure that comes back continues its history (attempts, first_seen); one that
        does not is gone for good at the next :meth:`settle`.
        """
        with self._lock:
            out = list(self._failures.values())
            self._retrying.update(self._failures)
            self._failures.clear()
            self._pass_started = time.time()
            self._dirty = True
            return out

    def take_due(self, now: float | None = None) -> list[Failure]:
        """Take out the failures whose retry is due (live mode retries them one by one)."""
        now = time.time() if now is None else now
        with self._lock:
            # Items of a retry that never finished (its round was aborted) go back first.
            for k, f in self._retrying.items():
                self._failures.setdefault(k, f)
            self._retrying.clear()
            due = [k for k, f in self._failures.items() if f.next_retry <= now]
            out = []
            for k in due:
                f = self._failures.pop(k)
                self._retrying[k] = f
                out.append(f)
            if due:
                self._pass_started = now
                self._dirty = True
            return out

    def settle(self) -> int:
        """After the retry work is done: items taken out that did not fail again succeeded.

        Returns how many were cleared.
        """
        with self._lock:
            n = len(self._retrying)
            self._retrying.clear()
            if n:
                self._dirty = True
        if n:
            self.count("failures_cleared", n)
        return n

    def drop(self, f: Failure, why: str) -> None:
        """Forget an item taken out for retry that no longer exists (logged)."""
        with self._lock:
            self._retrying.pop((f.kind, f.path), None)
            self._dirty = True
        log.warning("failure no longer applies (%s): %s", why, f.line())

    def next_due(self) -> float | None:
        """Wall-clock time of the earliest retry, None when there is nothing to retry."""
        with self._lock:
            return min((f.next_retry for f in self._failures.values()), default=None)

    def oldest_failure_ts(self) -> int | None:
        """The oldest mark (ns) a current failure was found at, None when there is none.

        A checkpoint T is not complete while ``oldest_failure_ts() < T`` (even when stime
        has passed T: marks move past failures, the ledger keeps them).  A failure from a
        pass with no mark in force counts as 0: older than any checkpoint.
        """
        with self._lock:
            items = list(self._failures.values()) + list(self._retrying.values())
        return min((f.since_ns for f in items), default=None)
