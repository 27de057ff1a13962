"""Syncer: moves file content for one file at a time (a pool of them runs in parallel).

A job waits for its file's ``ensure`` result when it has one: a file just created on
the secondary gets a full send of its data extents; a file that already existed there
(kept, linked, renamed, adopted) gets a block-signature delta, or nothing at all when
size and mtime already match.  Meta (owner, mode, xattrs, times) is applied last, by
``data_finish``, because writing data moves mtime.

With an external engine (``rsync``, ``tarssh``; see :mod:`actors.engines`) the Syncer
collects the files instead and runs the engine once per batch (``BATCH_FILES`` files or
``BATCH_BYTES`` bytes, and at every ``barrier``).  Afterwards each file is checked: the
primary file must still be the same object, unchanged since before the batch (else it
is queued again, up to ``MAX_TRIES`` times), and the secondary object of its gfid must
have the primary's size (the engine wrote by path; this catches a path that no longer
led to that gfid).  Only then one ``ops`` request stamps the exact meta of every file
of the batch, times last.  A file that fails a check keeps the engine's fresh mtime on
the secondary, so the next pass sees it differ and sends it again.
"""

from __future__ import annotations

import errno
import logging
import os
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any

import pykka

from actors.engines import BATCH_BYTES, BATCH_FILES, EngineSpec, TokenBucket, run_batch
from actors.faults import check_read, fault
from actors.inspect import Inspectable
from actors.ledger import Ledger
from actors.reconcile import DataJob
from fsops.primary import PrimaryTree
from fsops.transfer import FileChanged, TransferStats, push_file
from transport import Channel, FileRange

log = logging.getLogger("georep.syncer")

#: A file that keeps changing while we read it is tried this many times per pass.
MAX_TRIES = 3


class Syncer(Inspectable, pykka.ThreadingActor):
    """Pushes the data of the files it is given."""

    def __init__(self, channel: Channel, primary: PrimaryTree, ledger: Ledger,
                 *, timeout: float = 600.0, engine: EngineSpec | None = None,
                 bucket: TokenBucket | None = None, batch_files: int = BATCH_FILES,
                 batch_bytes: int = BATCH_BYTES) -> None:
        super().__init__()
        self.channel = channel
        self.primary = primary
        self.ledger = ledger
        self.timeout = timeout
        self.tstats = TransferStats()
        #: None: the native engine; else an external engine run per batch.
        self.engine = engine
        #: The bandwidth limit shared by every Syncer (native: around data_write payloads).
        self.bucket = bucket
        self.batch_files = batch_files
        self.batch_bytes = batch_bytes
        self._batch: list[tuple[DataJob, int]] = []  # (job, tries so far)
        self._batch_size = 0

    def _rpc(self, method: str, args: dict[str, Any], payload: bytes | None) -> Future[Any]:
        if payload and method == "data_write":
            if self.bucket is not None:
                self.bucket.consume(len(payload))
            # Counted as it goes (not when the file is done): status's bytes/s over the
            # last minute sees a large file moving.
            self.ledger.count("data_bytes", len(payload))
        fut = self.channel.call_async(method, args, payload)
        if method == "data_write":
            fault("mid_data")  # a data transfer cut after its first write
        return fut

    def sync(self, job: DataJob, ensure_ref: tuple[Future[Any], int] | None) -> None:
        """Push one file's data (and then its meta)."""
        e = job.entry
        remote_size = job.remote_size
        if ensure_ref is not None:
            fut, idx = ensure_ref
            try:
                status = fut.result(timeout=self.timeout)[idx].get("s")
            except Exception:
                return  # the batch failure is already in the ledger
            if status == "error":
                return  # the ensure failure is already in the ledger
            if status == "created":
                remote_size = 0
            elif job.if_created:
                return
        if remote_size is None:
            st = self.channel.call("stat_gfid", {"gfid": e.gfid}, timeout=self.timeout)
            if st is None:
                remote_size = 0
            else:
                remote_size = st[4]
                if st[4] == e.size and st[5] == e.mtime_ns:
                    self._meta_only(job)
                    return
        if self.engine is not None and job.handle is None:
            self._queue(job, 0)  # (a job by file handle has no path for an engine)
            return
        for _attempt in range(MAX_TRIES):
            try:
                check_read(job.relpath)  # test-only fault point (docs/faults.md)
                fd = self._open(job)
            except OSError as ex:
                self.ledger.fail("data", "open", job.relpath, e.gfid, ex.errno,
                                 ex.strerror or str(ex))
                return
            if fd is None:
                self._vanished(job)
                return
            try:
                st = os.fstat(fd)
                meta = e.meta()
                meta["mtime"], meta["atime"] = st.st_mtime_ns, st.st_atime_ns
                push_file(self._rpc, e.gfid, fd, meta=meta, remote_size=remote_size,
                          stats=self.tstats, timeout=self.timeout, file_range=FileRange)
                self.ledger.count("data_files")
                return
            except FileChanged:
                self.ledger.count("data_changed_while_read")
                # Part of it may be on the secondary now: compare blocks from here on.
                remote_size = max(remote_size or 0, 1)
            except OSError as ex:
                self.ledger.fail("data", "push", job.relpath, e.gfid, ex.errno,
                                 ex.strerror or str(ex))
                return
            except Exception as ex:
                self.ledger.fail("data", "push", job.relpath, e.gfid,
                                 getattr(ex, "errno", None), str(ex))
                return
            finally:
                os.close(fd)
        self.ledger.fail("data", "push", job.relpath, e.gfid, None,
                         f"file kept changing while being read ({MAX_TRIES} tries)")

    def _meta_only(self, job: DataJob) -> None:
        res = self.channel.call("ops", {"ops": [{"op": "meta", "gfid": job.entry.gfid,
                                                  "meta": job.entry.meta()}]},
                                timeout=self.timeout)[0]
        if res.get("s") == "error":
            self.ledger.fail("meta", "meta", job.relpath, job.entry.gfid, res.get("errno"),
                             res.get("message", "failed"))
        else:
            self.ledger.count("meta")

    # -- external engines: batches ----------------------------------------------------------

    def _queue(self, job: DataJob, tries: int) -> None:
        self._batch.append((job, tries))
        self._batch_size += job.entry.size
        if len(self._batch) >= self.batch_files or self._batch_size >= self.batch_bytes:
            self._run_batch()

    def _run_batch(self) -> None:
        """Run the engine once for the queued files, check each, stamp their meta."""
        assert self.engine is not None
        batch, self._batch, self._batch_size = self._batch, [], 0
        if not batch:
            return
        engine = self.engine.engine
        before: list[tuple[DataJob, int, os.stat_result]] = []
        for job, tries in batch:
            st = self._primary_stat(job)
            if st is not None:
                before.append((job, tries, st))
        if not before:
            return
        outcome = run_batch(self.engine, [job.relpath for job, _, _ in before],
                            timeout=self.timeout * 6)
        self.ledger.count(f"{engine}_runs")
        if outcome.fatal is not None:
            log.warning("%s failed for %d file(s): %s", engine, len(before), outcome.fatal)
            for job, _, _ in before:
                self.ledger.fail("data", engine, job.relpath, job.entry.gfid, None,
                                 outcome.fatal)
            return
        checked: list[tuple[DataJob, os.stat_result, Future[Any]]] = []
        for job, tries, st0 in before:
            line = outcome.failed.get(job.relpath)
            st1 = self._primary_stat(job)
            if st1 is None:
                continue
            if _changed(st0, st1):
                self.ledger.count("data_changed_while_read")
                if tries + 1 < MAX_TRIES:
                    self._queue(job, tries + 1)
                else:
                    self.ledger.fail("data", engine, job.relpath, job.entry.gfid, None,
                                     f"file kept changing while being read ({MAX_TRIES} tries)")
                continue
            if line is not None:
                self.ledger.fail("data", engine, job.relpath, job.entry.gfid, None,
                                 f"{engine}: {line}")
                continue
            checked.append((job, st1, self.channel.call_async(
                "stat_gfid", {"gfid": job.entry.gfid}, timeout=self.timeout)))
        ops: list[dict[str, Any]] = []
        jobs: list[DataJob] = []
        for job, st, fut in checked:
            try:
                remote = fut.result(self.timeout)
            except Exception as ex:
                self.ledger.fail("data", engine, job.relpath, job.entry.gfid,
                                 getattr(ex, "errno", None), str(ex))
                continue
            if remote is None or remote[4] != st.st_size:
                got = "no such gfid" if remote is None else f"size {remote[4]}"
                self.ledger.fail("data", engine, job.relpath, job.entry.gfid, None,
                                 f"{engine} did not update the secondary file ({got}, expected "
                                 f"size {st.st_size}); its path may have changed meanwhile")
                continue
            meta = job.entry.meta()
            meta["mtime"], meta["atime"] = st.st_mtime_ns, st.st_atime_ns
            ops.append({"op": "meta", "gfid": job.entry.gfid, "meta": meta})
            jobs.append(job)
        if ops:
            self._stamp(engine, ops, jobs)

    def _stamp(self, engine: str, ops: list[dict[str, Any]], jobs: list[DataJob]) -> None:
        try:
            results = self.channel.call("ops", {"ops": ops}, timeout=self.timeout)
        except Exception as ex:
            for job in jobs:
                self.ledger.fail("data", engine, job.relpath, job.entry.gfid,
                                 getattr(ex, "errno", None), f"meta after {engine}: {ex}")
            return
        for job, res in zip(jobs, results, strict=True):
            if res.get("s") == "error":
                self.ledger.fail("meta", "meta", job.relpath, job.entry.gfid, res.get("errno"),
                                 res.get("message", "failed"))
                continue
            self.ledger.count("data_files")
            self.tstats.files += 1
            self.tstats.bytes_sent += job.entry.size  # handed to the engine (not on the wire)
            self.ledger.count("data_bytes", job.entry.size)

    def _primary_stat(self, job: DataJob) -> os.stat_result | None:
        """stat of the primary file if ``relpath`` still holds the job's gfid, else None."""
        try:
            fd = self._open(job)
        except OSError as ex:
            self.ledger.fail("data", "open", job.relpath, job.entry.gfid, ex.errno,
                             ex.strerror or str(ex))
            return None
        if fd is None:
            self._vanished(job)
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def _open(self, job: DataJob) -> int | None:
        if job.handle is not None:
            return self.primary.open_handle(job.handle, job.entry.gfid)
        return self.primary.open_file(job.relpath, job.entry.gfid)

    def _vanished(self, job: DataJob) -> None:
        """The file is no longer at ``relpath`` (removed, replaced, or an ancestor renamed).

        Not dropped: a failure naming the parent directory makes the retry re-check it,
        which finds the file where it is now, or deletes it on the secondary if it is gone.
        """
        self.ledger.count("data_vanished")
        self.ledger.fail("data", "open", job.relpath, job.entry.gfid, errno.ENOENT,
                         "no longer at this path since it was queued; re-checked",
                         pgfid=job.pgfid)

    def barrier(self) -> None:
        """Returns once every job told before it is done (actors handle messages in order).

        With an external engine it runs what is queued first (files that changed while
        read are queued again, so this loops until the queue is empty).
        """
        while self._batch:
            self._run_batch()

    def inspect_extra(self) -> dict[str, Any]:
        """Transfer counters and the external engine's batch (read-only, another thread)."""
        return {**asdict(self.tstats), "batch_files": len(self._batch)}

    def stats(self) -> dict[str, int]:
        """Bytes sent, matched and the like for this Syncer."""
        return asdict(self.tstats)


def _changed(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) != (b.st_size, b.st_mtime_ns, b.st_ctime_ns)
