"""Syncer: moves file content for one file at a time (a pool of them runs in parallel).

A job waits for its file's ``ensure`` result when it has one: a file just created on
the secondary gets a full send of its data extents; a file that already existed there
(kept, linked, renamed, adopted) gets a block-signature delta, or nothing at all when
size and mtime already match.  Meta (owner, mode, xattrs, times) is applied last, by
``data_finish``, because writing data moves mtime.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any

import pykka

from actors.ledger import Ledger
from actors.reconcile import DataJob
from fsops.primary import PrimaryTree
from fsops.transfer import FileChanged, TransferStats, push_file
from transport import Channel

log = logging.getLogger("georep.syncer")

#: A file that keeps changing while we read it is tried this many times per pass.
MAX_TRIES = 3


class Syncer(pykka.ThreadingActor):
    """Pushes the data of the files it is given."""

    def __init__(self, channel: Channel, primary: PrimaryTree, ledger: Ledger,
                 *, timeout: float = 600.0) -> None:
        super().__init__()
        self.channel = channel
        self.primary = primary
        self.ledger = ledger
        self.timeout = timeout
        self.tstats = TransferStats()

    def _rpc(self, method: str, args: dict[str, Any], payload: bytes | None) -> Future[Any]:
        return self.channel.call_async(method, args, payload)

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
        for _attempt in range(MAX_TRIES):
            fd = self.primary.open_file(job.relpath, e.gfid)
            if fd is None:
                self.ledger.count("data_vanished")
                return  # gone or replaced since the crawl saw it: the next pass sees that
            try:
                st = os.fstat(fd)
                meta = e.meta()
                meta["mtime"], meta["atime"] = st.st_mtime_ns, st.st_atime_ns
                push_file(self._rpc, e.gfid, fd, meta=meta, remote_size=remote_size,
                          stats=self.tstats, timeout=self.timeout)
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

    def barrier(self) -> None:
        """Returns once every job told before it is done (actors handle messages in order)."""

    def stats(self) -> dict[str, int]:
        """Bytes sent, matched and the like for this Syncer."""
        return asdict(self.tstats)
