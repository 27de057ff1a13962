"""Supervisor: builds the pipeline of one worker, runs it, stops it in reverse.

``run_once`` is the ``sync --once`` job: connect to the secondary host, run a hybrid
crawl (Crawler -> Batcher -> EntryApplier on the secondary, data through the Syncer
pool), let the secondary purge what was deleted, make it durable, and only then move
the marks on the primary root.  When items failed, one more crawl retries them (it
re-derives exactly what is still different); what still fails is reported, never
dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.batcher import Batcher
from actors.crawler import Crawler
from actors.ledger import Failure, Ledger
from actors.remote import RemoteProxy
from actors.syncer import Syncer
from fsops import marks
from fsops.primary import PrimaryTree
from transport.endpoint import Endpoint, parse_secondary

log = logging.getLogger("georep.supervisor")


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

    def run_once(self) -> Summary:
        """Make the secondary equal to the primary now; see the module docstring."""
        o = self.options
        t0 = time.monotonic()
        summary = Summary(o.primary, str(self.endpoint))
        primary = PrimaryTree(os.fsencode(o.primary))
        remote = RemoteProxy.start(self.endpoint, ssh_command=o.ssh_command,
                                   remote_command=o.remote_command)
        try:
            proxy = remote.proxy()
            proxy.connect().get(timeout=o.timeout)
            channel = proxy.channel().get(timeout=o.timeout)
            transfer: dict[str, int] = {}
            for n in range(1 + o.retries):
                if n:
                    log.info("retrying failed items pass=%d failures=%d", n + 1,
                             len(self.ledger.failures()))
                    self.ledger.clear_failures()
                started_ns = time.time_ns()
                for k, v in self._one_pass(primary, channel).items():
                    transfer[k] = transfer.get(k, 0) + v
                summary.passes = n + 1
                if not self.ledger.failures():
                    self._commit_marks(primary, channel, started_ns, summary)
                    break
            summary.transfer = transfer
            summary.counters = dict(self.ledger.counters)
            summary.failures = self.ledger.failures()
        finally:
            remote.stop()
            primary.close()
        summary.seconds = time.monotonic() - t0
        return summary

    def _one_pass(self, primary: PrimaryTree, channel: Any) -> dict[str, int]:
        o = self.options
        credits = threading.Semaphore(64)
        done: Future[None] = Future()
        started: list[pykka.ActorRef[Any]] = []
        try:
            syncer_refs = [Syncer.start(channel, primary, self.ledger, timeout=o.timeout)
                           for _ in range(max(1, o.jobs))]
            started += syncer_refs
            syncers = [r.proxy() for r in syncer_refs]
            batcher_ref = Batcher.start(channel, self.ledger, syncers, credits, max_ops=o.max_ops)
            started.append(batcher_ref)
            crawler_ref = Crawler.start(primary, channel, batcher_ref.proxy(), self.ledger,
                                        credits, done, timeout=o.timeout)
            started.append(crawler_ref)
            crawler_ref.proxy().begin.defer()
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

    def _commit_marks(self, primary: PrimaryTree, channel: Any, started_ns: int,
                      summary: Summary) -> None:
        # Marks move only after the secondary says everything applied so far is durable.
        channel.call("commit", {}, timeout=self.options.timeout)
        for which in ("entry_stime", "stime"):
            marks.write_mark(primary.root_fd, self.session, which, started_ns)
            summary.marks[which] = started_ns
