"""Parallel apply of one batch of entry/meta ops on the secondary.

A first sync is one ``ensure`` (create) per object, and each costs a few file-system
syscalls (the ``O_CREAT`` open, the gfid xattr, the index hardlink, data, meta) that
release the GIL.  Applying them one at a time leaves the disk and the second CPU idle,
so a batch is applied by a small pool of threads, with the result each op would have
had applied alone, in order.  The rule (docs/design.md, "Parallel apply"):

- An op may run on the pool only if it is *local*: it touches one name in one
  directory and one gfid, and nothing another op of the batch could also touch.
  That is

  - an ``ensure`` of a regular file, directory or symlink that is a plain create:
    the name is free (checked here, before dispatch) or lies in a directory created
    earlier in the same batch; its gfid is not in the index and no earlier op of the
    running phase makes it (a second hardlink of a new file is not local); no
    earlier op of the phase uses the same (parent, name);
  - a ``meta`` op: it runs after the op that creates its gfid, after the earlier
    meta ops of that gfid and, for a directory, after every op of the phase inside
    that directory (the directory's times come after its entries).

  A local op whose parent directory is created in the same phase runs after that
  create.
- Every other op (delete, rename, an ensure that evicts, adopts, links or renames
  an existing object, devices/fifos/sockets, a malformed op) is *serial*: the pool
  is drained first, then the op runs alone on the calling thread.  It may move or
  remove directories, so nothing else may be resolving paths meanwhile.

Results are returned in the batch's order, one per op, as ``SecondaryFS.apply_ops``.
Directory fds are shared by the threads (fsops.secondary_index.FdCache): while a
phase runs, fds that leave the caches are closed only once the pool has drained.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from fsops.constants import RESERVED_GFIDS, T_DIR, T_FILE, T_SYMLINK
from fsops.secondary import SecondaryFS
from fsops.secondary_index import check_gfid, check_name

__all__ = ["ParallelApplier", "plan_local"]

#: Types whose plain create is local (devices, fifos and sockets are rare: serial).
_LOCAL_TYPES = frozenset({T_FILE, T_DIR, T_SYMLINK})

Result = dict[str, Any]


class _Phase:
    """What the ops on the pool since the last drain make and use."""

    def __init__(self) -> None:
        #: gfid -> future of the op that creates it (files, directories, symlinks).
        self.made: dict[bytes, Future[Result]] = {}
        #: directory gfid -> futures of the ops of this phase inside it.
        self.inside: dict[bytes, list[Future[Result]]] = {}
        #: gfid -> future of its latest meta op.
        self.meta: dict[bytes, Future[Result]] = {}
        #: (parent gfid, name) used by a create of this phase.
        self.names: set[tuple[bytes, bytes]] = set()
        self.futures: list[Future[Result]] = []


def plan_local(op: object, phase: _Phase,
               name_free: Callable[[bytes, bytes], bool],
               gfid_known: Callable[[bytes], bool]) -> list[Future[Result]] | None:
    """Dependencies of ``op`` if it may run on the pool in ``phase``, else None (serial).

    ``name_free(pgfid, name)``: the name is free in that existing directory (False when
    the directory is unknown); ``gfid_known(gfid)``: the gfid has an index entry.
    """
    if not isinstance(op, dict):
        return None
    kind = op.get("op")
    try:
        if kind == "meta":
            gfid = check_gfid(op.get("gfid"))
            if not isinstance(op.get("meta"), dict):
                return None
            deps = list(phase.inside.get(gfid, ()))
            for table in (phase.made, phase.meta):
                f = table.get(gfid)
                if f is not None:
                    deps.append(f)
            return deps
        if kind != "ensure" or op.get("type") not in _LOCAL_TYPES:
            return None
        pgfid = check_gfid(op.get("pgfid"))
        name = check_name(op.get("name"))
        gfid = check_gfid(op.get("gfid"))
    except OSError:
        return None  # the serial path reports it
    if gfid in RESERVED_GFIDS or gfid in phase.made or gfid in phase.meta \
            or gfid in phase.inside or (pgfid, name) in phase.names:
        return None
    if pgfid in phase.meta:
        return None  # the directory's times are set: an entry now comes after, serially
    parent = phase.made.get(pgfid)
    if parent is not None:
        deps = [parent]  # a directory this phase creates: empty but for this phase's names
    elif not name_free(pgfid, name):
        return None
    else:
        deps = []
    if gfid_known(gfid):
        return None
    return deps


class ParallelApplier:
    """Applies batches with ``threads`` pool threads sharing one SecondaryFS."""

    def __init__(self, fs: SecondaryFS, threads: int) -> None:
        self.fs = fs
        self.threads = threads
        self._pool = (ThreadPoolExecutor(threads, thread_name_prefix="apply")
                      if threads > 1 else None)
        #: Ops run on the pool / serially since start (for inspection and tests).
        self.parallel = 0
        self.serial = 0

    def close(self) -> None:
        """Stop the pool (waits for nothing: it is idle between batches)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def apply_ops(self, ops: list[Any]) -> list[Result]:
        """Apply ``ops`` with the result each would have applied alone, in order."""
        idx = self.fs.index
        caches = (idx.dirs, idx.bucket_cache)
        for c in caches:
            c.hold()  # (also saves re-checking each cached directory per op)
        try:
            if self._pool is None or len(ops) < 2:
                self.serial += len(ops)
                return self.fs.apply_ops(ops)
            return self._apply(ops)
        finally:
            for c in caches:
                c.release()

    def _apply(self, ops: list[Any]) -> list[Result]:
        assert self._pool is not None
        out: list[Result | Future[Result]] = []
        phase = _Phase()
        for op in ops:
            deps = plan_local(op, phase, self._name_free, self._gfid_known)
            if deps is None:
                if phase.futures:
                    wait(phase.futures)
                    phase = _Phase()
                out.append(self.fs.apply_ops([op])[0])
                self.serial += 1
                continue
            fut = self._pool.submit(self._run, op, deps)
            self.parallel += 1
            self._record(op, fut, phase)
            out.append(fut)
        wait(phase.futures)
        return [r.result() if isinstance(r, Future) else r for r in out]

    @staticmethod
    def _record(op: dict[str, Any], fut: Future[Result], phase: _Phase) -> None:
        phase.futures.append(fut)
        if op["op"] == "meta":
            phase.meta[op["gfid"]] = fut
            return
        phase.made[op["gfid"]] = fut
        phase.names.add((op["pgfid"], op["name"]))
        phase.inside.setdefault(op["pgfid"], []).append(fut)

    def _run(self, op: dict[str, Any], deps: list[Future[Result]]) -> Result:
        if deps:
            wait(deps)
        return self.fs.apply_ops([op])[0]

    def _name_free(self, pgfid: bytes, name: bytes) -> bool:
        try:
            pfd = self.fs.index.dir_fd(pgfid)
            if pfd is None:
                return False
            os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # unusable: the serial path reports why
        return False

    def _gfid_known(self, gfid: bytes) -> bool:
        try:
            return self.fs.index.lstat(gfid) is not None
        except OSError:
            return True
