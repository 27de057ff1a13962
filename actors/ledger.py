"""Per-item failures and counters, shared by the actors of one worker.

Failures are values collected here, never exceptions that kill a batch: one bad file
must not stop the rest, and it must not be forgotten either.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass


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

    def line(self) -> str:
        """One line a person can act on."""
        err = f" [errno {self.errno}]" if self.errno else ""
        return f"{self.kind} {self.op} {os.fsdecode(self.path)!r}: {self.message}{err}"


class Ledger:
    """Thread-safe failure list and counters for one sync pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, bytes], Failure] = {}
        self.counters: Counter[str] = Counter()

    def fail(self, kind: str, op: str, path: bytes, gfid: bytes | None,
             errno: int | None, message: str) -> None:
        """Record a failure (a repeat of the same item bumps its attempts)."""
        now = time.time()
        key = (kind, path)
        with self._lock:
            old = self._failures.get(key)
            if old is not None:
                old.attempts += 1
                old.last_seen = now
                old.errno, old.message, old.op = errno, message, op
            else:
                self._failures[key] = Failure(kind, op, path, gfid, errno, message, 1, now, now)

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
        """Take the failures out (before a retry pass re-derives them)."""
        with self._lock:
            out = list(self._failures.values())
            self._failures.clear()
            return out
