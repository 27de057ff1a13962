"""Batcher: groups entry and meta ops into batches and hands data work to the Syncers.

Ops arrive in apply order from the Crawler and leave in the same order, cut into
batches by count and by inline bytes.  A data job is forwarded to a Syncer only after
the batch holding its file's ``ensure`` has been sent, so the secondary (which applies
requests in order) always has the file before its data.  Flow control: the Crawler
takes a credit per ``add`` and the Batcher returns it once the ops are on the wire;
the channel bounds the batches in flight.
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


class Batcher(Inspectable, pykka.ThreadingActor):
    """Cuts ordered batches of ops and sends them to the secondary's EntryApplier."""

    def __init__(self, channel: Channel, ledger: Ledger, syncers: list[Any],
                 credits: threading.Semaphore, *, max_ops: int = 1024,
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
        self._sent: list[Future[Any]] = []
        self._listings: list[tuple[bytes, Future[Any]]] = []

    def add(self, ops: list[dict[str, Any]], paths: list[bytes], jobs: list[DataJob],
            listings: list[tuple[bytes, Future[Any]]] | None = None) -> None:
        """Queue ops (with the path of each, for reports) and the data jobs that follow them.

        ``listings`` are directories to list *after* these ops are applied (adopted
        directories are known by their gfid only then); each future gets the reply.
        """
        try:
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
            if len(self._ops) >= self.max_ops or self._bytes >= self.max_bytes:
                self.flush()
        finally:
            self.credits.release()

    def flush(self) -> None:
        """Send what is queued now."""
        if not self._ops and not self._jobs and not self._listings:
            return
        ops, paths, jobs, listings = self._ops, self._paths, self._jobs, self._listings
        self._ops, self._paths, self._jobs, self._bytes = [], [], [], 0
        self._listings = []
        fut: Future[Any] | None = None
        if ops:
            fut = self.channel.call_async("ops", {"ops": ops})
            fut.add_done_callback(lambda f: self._account(f, ops, paths))
            self._sent.append(fut)
            self._sent = [f for f in self._sent if not f.done()]
            self.ledger.count("batches")
        for gfid, waiter in listings:
            _chain(self.channel.call_async("list_dir", {"gfid": gfid, "ordered": True}), waiter)
        for job, idx in jobs:
            ref = (fut, idx) if idx is not None and fut is not None else None
            assert self._rr is not None
            self.syncers[next(self._rr)].sync.defer(job, ref)

    def _account(self, fut: Future[Any], ops: list[dict[str, Any]], paths: list[bytes]) -> None:
        """Count statuses and record per-op failures (runs in the channel's reader thread)."""
        try:
            results = fut.result()
        except Exception as e:
            for op, path in zip(ops, paths, strict=True):
                self.ledger.fail(_KIND[op["op"]], op["op"], path, op.get("gfid"),
                                 getattr(e, "errno", None), f"batch failed: {e}",
                                 pgfid=op.get("npgfid") or op.get("pgfid"))
            return
        fault("after_entry_ops")
        counts: dict[str, int] = {}
        for op, path, res in zip(ops, paths, results, strict=True):
            status = res.get("s")
            if status == "error":
                self.ledger.fail(_KIND[op["op"]], op["op"], path, op.get("gfid"),
                                 res.get("errno"), res.get("message", "failed"),
                                 pgfid=op.get("npgfid") or op.get("pgfid"))
                continue
            key = "meta" if op["op"] == "meta" else str(status)
            counts[key] = counts.get(key, 0) + 1
            if op.get("data") is not None:
                counts["inline_files"] = counts.get("inline_files", 0) + 1
                counts["inline_bytes"] = counts.get("inline_bytes", 0) + len(op["data"])
        self.ledger.add_counts(counts)

    def inspect_extra(self) -> dict[str, Any]:
        """What waits here and on the wire (read from the inspecting thread: reads only)."""
        return {"pending_ops": len(self._ops), "pending_bytes": self._bytes,
                "pending_data_jobs": len(self._jobs), "pending_listings": len(self._listings),
                "batches_unanswered": sum(1 for f in list(self._sent) if not f.done())}

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
