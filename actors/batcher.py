"""Batcher: groups entry and meta ops into batches and hands data work to the Syncers.

Ops arrive in apply order from the Crawler and leave in the same order, cut into
batches by count and by inline bytes.  A data job is forwarded to a Syncer only after
the batch holding its file's ``ensure`` has been sent, so the secondary (which applies
requests in order) always has the file before its data.

Flow control (:class:`Credits`): pykka inboxes are unbounded, so the Crawler takes
credits counted in *ops and inline bytes* before each ``add``, and they come back only
when the secondary has answered the batch holding those ops.  Everything between the
Crawler and the secondary's reply (the Batcher's mailbox, its pending batch, batches on
the wire) therefore stays under one budget whatever the shape of the tree: a directory
of 100,000 entries costs 100,000 credits, not one.  While a batch is unanswered only a
compact record per op is kept (for the ledger), not the op with its meta and data.
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import Future
from typing import Any

import pykka

from actors.faults import fault
from actors.inspect import Inspectable
from actors.ledger import Ledger
from actors.reconcile import DataJob
from transport import Channel

log = logging.getLogger("georep.batcher")

_KIND = {"ensure": "entry", "delete": "entry", "rename": "entry", "meta": "meta"}

#: Default budget of ops (and inline bytes) between the Crawler and the secondary's
#: replies.  An ``ensure`` op costs ~0.9 KiB of Python objects (its dict, meta dict,
#: names, gfids; tracemalloc) until it is sent, ~0.2 KiB while unanswered (``_Sent`` and
#: its path): 8192 ops are under 8 MiB, and still eight full batches (``max_ops`` 1024)
#: to keep the secondary busy.  Before, 64 *directories* were the unit: ~95,000 ops
#: (~110 MiB of RSS) waited behind a slow secondary (BENCHMARKS.md, memory).
MAX_OPS_IN_FLIGHT = 8192
MAX_BYTES_IN_FLIGHT = 32 << 20


class Credits:
    """A budget of ops and inline bytes in flight, shared by the Crawler and the Batcher.

    ``acquire`` blocks while the new cost would exceed either limit; a cost larger than
    the whole budget (one huge directory) is let through alone, once nothing else is
    held, so memory stays bounded by the budget or by the largest directory, whichever
    is larger.  ``peak_ops`` / ``peak_bytes`` record the most ever held (for tests and
    the shell).
    """

    def __init__(self, max_ops: int = MAX_OPS_IN_FLIGHT,
                 max_bytes: int = MAX_BYTES_IN_FLIGHT) -> None:
        if max_ops < 1 or max_bytes < 1:
            raise ValueError("the credit budget must be positive")
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self.ops = 0
        self.bytes = 0
        self.peak_ops = 0
        self.peak_bytes = 0
        self._cond = threading.Condition()

    def _fits(self, ops: int, nbytes: int) -> bool:
        if self.ops == 0 and self.bytes == 0:
            return True
        return self.ops + ops <= self.max_ops and self.bytes + nbytes <= self.max_bytes

    def acquire(self, ops: int, nbytes: int = 0, timeout: float | None = None) -> bool:
        """Take ``ops`` op credits and ``nbytes`` byte credits; False after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._fits(ops, nbytes), timeout):
                return False
            self.ops += ops
            self.bytes += nbytes
            self.peak_ops = max(self.peak_ops, self.ops)
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return True

    def release(self, ops: int, nbytes: int = 0) -> None:
        """Give credits back (the secondary answered the ops, or they were dropped)."""
        with self._cond:
            self.ops -= ops
            self.bytes -= nbytes
            if self.ops < 0 or self.bytes < 0:
                raise RuntimeError("credits released twice")
            self._cond.notify_all()

    def snapshot(self) -> dict[str, int]:
        """Held now and the peaks (read without the lock: ints, for status only)."""
        return {"ops": self.ops, "bytes": self.bytes, "peak_ops": self.peak_ops,
                "peak_bytes": self.peak_bytes, "max_ops": self.max_ops,
                "max_bytes": self.max_bytes}


def cost(ops: list[dict[str, Any]], jobs: list[DataJob]) -> tuple[int, int]:
    """Credits an ``add`` of these ops and data jobs takes: (ops, inline bytes).

    Every add costs at least one op credit, so a stream of directories with nothing to
    do is bounded too.
    """
    nbytes = 0
    for op in ops:
        data = op.get("data")
        if data:
            nbytes += len(data)
    return max(1, len(ops) + len(jobs)), nbytes


class _Sent:
    """What the ledger needs of one op while its batch is unanswered (not its meta/data)."""

    __slots__ = ("data_len", "gfid", "op", "path", "pgfid")

    def __init__(self, op: dict[str, Any], path: bytes) -> None:
        self.op: str = op["op"]
        self.path = path
        self.gfid: bytes | None = op.get("gfid")
        self.pgfid: bytes | None = op.get("npgfid") or op.get("pgfid")
        data = op.get("data")
        self.data_len = -1 if data is None else len(data)


class Batcher(Inspectable, pykka.ThreadingActor):
    """Cuts ordered batches of ops and sends them to the secondary's EntryApplier."""

    def __init__(self, channel: Channel, ledger: Ledger, syncers: list[Any],
                 credits: Credits, *, max_ops: int = 1024,
                 max_bytes: int = 4 << 20) -> None:
        super().__init__()
        self.channel = channel
        self.ledger = ledger
        self.syncers = syncers
        self._rr = itertools.cycle(range(len(syncers))) if syncers else None
        self.credits = credits
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self._ops: list[dict[str, Any]] = []
        self._paths: list[bytes] = []
        self._jobs: list[tuple[DataJob, int | None]] = []
        self._bytes = 0
        #: Credits of the queued ops and jobs (returned when their batch is answered).
        self._held = (0, 0)
        self._sent: list[Future[Any]] = []
        self._listings: list[tuple[bytes, Future[Any]]] = []

    def add(self, ops: list[dict[str, Any]], paths: list[bytes], jobs: list[DataJob],
            listings: list[tuple[bytes, Future[Any]]] | None = None,
            credit: tuple[int, int] | None = None) -> None:
        """Queue ops (with the path of each, for reports) and the data jobs that follow them.

        ``listings`` are directories to list *after* these ops are applied (adopted
        directories are known by their gfid only then); each future gets the reply.
        ``credit`` is what the caller took from the shared :class:`Credits` for this add
        (default: ``cost(ops, jobs)``); it comes back when the batch is answered.
        """
        taken = cost(ops, jobs) if credit is None else credit
        if not ops and not jobs and not listings:
            self._give_back(taken)  # a directory with nothing to do holds nothing here
            return
        self._held = (self._held[0] + taken[0], self._held[1] + taken[1])
        self._listings.extend(listings or ())
        base = len(self._ops)
        self._ops.extend(ops)
        self._paths.extend(paths)
        for op in ops:
            data = op.get("data")
            if data:
                self._bytes += len(data)
        for job in jobs:
            self._jobs.append((job, None if job.ensure_index is None
                               else base + job.ensure_index))
        if len(self._ops) >= self.max_ops or self._bytes >= self.max_bytes or self._idle():
            self.flush()

    def _idle(self) -> bool:
        # Nothing of ours is being applied: send now rather than wait for a full batch, so
        # the secondary starts on the first directory while the Crawler reads the next
        # (a first sync's secondary waited ~0.3 s for its first 1,024 ops).  Batches grow
        # by themselves once the secondary is the slower side.
        return all(f.done() for f in self._sent)

    def flush(self) -> None:
        """Send what is queued now."""
        if not self._ops and not self._jobs and not self._listings:
            self._give_back(self._held)
            self._held = (0, 0)
            return
        ops, paths, jobs, listings = self._ops, self._paths, self._jobs, self._listings
        held, self._held = self._held, (0, 0)
        self._ops, self._paths, self._jobs, self._bytes = [], [], [], 0
        self._listings = []
        fut: Future[Any] | None = None
        try:
            if ops:
                fut = self.channel.call_async("ops", {"ops": ops})
                sent = [_Sent(op, path) for op, path in zip(ops, paths, strict=True)]
                del ops, paths  # only the compact records wait for the reply
                fut.add_done_callback(lambda f: self._account(f, sent, held))
                self._sent.append(fut)
                self._sent = [f for f in self._sent if not f.done()]
                self.ledger.count("batches")
        finally:
            if fut is None:
                self._give_back(held)  # nothing to answer (or the send failed)
        for gfid, waiter in listings:
            _chain(self.channel.call_async("list_dir", {"gfid": gfid, "ordered": True}), waiter)
        for job, idx in jobs:
            ref = (fut, idx) if idx is not None and fut is not None else None
            assert self._rr is not None
            self.syncers[next(self._rr)].sync.defer(job, ref)

    def on_stop(self) -> None:
        self._give_back(self._held)  # a Crawler waiting for them must not wait in vain
        self._held = (0, 0)

    def on_failure(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.on_stop()

    def _give_back(self, held: tuple[int, int]) -> None:
        if held != (0, 0):
            self.credits.release(*held)

    def _account(self, fut: Future[Any], sent: list[_Sent], held: tuple[int, int]) -> None:
        """Count statuses, record per-op failures and give the batch's credits back
        (runs in the channel's reader thread)."""
        try:
            self._record(fut, sent)
        finally:
            self._give_back(held)

    def _record(self, fut: Future[Any], sent: list[_Sent]) -> None:
        try:
            results = fut.result()
        except Exception as e:
            for s in sent:
                self.ledger.fail(_KIND[s.op], s.op, s.path, s.gfid,
                                 getattr(e, "errno", None), f"batch failed: {e}",
                                 pgfid=s.pgfid)
            return
        fault("after_entry_ops")
        counts: dict[str, int] = {}
        for s, res in zip(sent, results, strict=True):
            status = res.get("s")
            if status == "error":
                self.ledger.fail(_KIND[s.op], s.op, s.path, s.gfid,
                                 res.get("errno"), res.get("message", "failed"),
                                 pgfid=s.pgfid)
                continue
            key = "meta" if s.op == "meta" else str(status)
            counts[key] = counts.get(key, 0) + 1
            if s.data_len >= 0:
                counts["inline_files"] = counts.get("inline_files", 0) + 1
                counts["inline_bytes"] = counts.get("inline_bytes", 0) + s.data_len
        self.ledger.add_counts(counts)

    def inspect_extra(self) -> dict[str, Any]:
        """What waits here and on the wire (read from the inspecting thread: reads only)."""
        return {"pending_ops": len(self._ops), "pending_bytes": self._bytes,
                "pending_data_jobs": len(self._jobs), "pending_listings": len(self._listings),
                "batches_unanswered": sum(1 for f in list(self._sent) if not f.done()),
                "credits": self.credits.snapshot()}

    def drain(self, timeout: float = 3600.0) -> None:
        """Flush, wait for every batch reply, then for every Syncer to finish its queue."""
        self.flush()
        for fut in self._sent:
            try:
                fut.result(timeout=timeout)
            except Exception:  # already recorded per op by _account
                pass
        self._sent.clear()
        for s in self.syncers:
            s.barrier().get(timeout=timeout)


def _chain(source: Future[Any], target: Future[Any]) -> None:
    """Complete ``target`` with ``source``'s outcome (runs in the channel's reader thread)."""

    def done(f: Future[Any]) -> None:
        exc = f.exception()
        if exc is not None:
            target.set_exception(exc)
        else:
            target.set_result(f.result())

    source.add_done_callback(done)
