"""Crawler: the hybrid crawl, walking the primary and comparing it with the secondary.

Depth-first, one directory per message (the actor stays responsive between
directories).  For each directory it lists the primary (assigning gfids on first
sight), gets the secondary's listing of the same gfid, asks the pure reconciler what
differs, reads the content of small files that must travel inline, and hands the ops
to the Batcher in order.  Listings of the next directories on the stack are requested
ahead of time; they are answered by the secondary's Lister out of band, which is safe
because every op re-checks gfids when it is applied.

Memory is bounded by the largest directory and the depth of the tree, not its size.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pykka

from actors.batcher import Credits, cost
from actors.faults import check_read
from actors.inspect import Inspectable
from actors.ledger import Ledger
from actors.reconcile import (
    NO_RULES,
    DataJob,
    Plan,
    Remote,
    Rules,
    SeenLinks,
    SubDir,
    dir_meta_needed,
    meta_differs,
    plan_dir,
)
from fsops import gfid as gfids
from fsops.constants import META_DIR, ROOT_GFID
from fsops.dirmap import DirMap
from fsops.primary import Entry, PrimaryTree
from transport import Channel
from transport.errors import NotFound

log = logging.getLogger("georep.crawler")

#: Listings requested ahead of the directory being crawled.
PREFETCH = 16
#: Ops per Batcher add of a large directory (the Batcher's batch size).
ADD_SLICE = 1024
#: Largest file content put inline in an op (the protocol's limit for ``data``).
INLINE_HARD_MAX = 1 << 20
#: Small files opened, and their reads started, at once before any is read (see
#: ``_open_ahead``).
READ_WINDOW = 64


@dataclass(slots=True)
class _Todo:
    sub: SubDir
    #: Secondary listing: a future, or None when the directory is known to be new (empty).
    listing: Future[Any] | None
    needs_listing: bool
    #: The listing comes through the Batcher, after the ops that precede it.
    ordered: bool = False
    #: Live re-check of only these names (the journal named them); None: every entry.
    names: list[bytes] | None = None


#: Which subdirectories a crawl descends into.
DESCEND_ALL = "all"  # hybrid crawl: the whole subtree
DESCEND_NEW = "new"  # live re-check: only directories not already in place on the secondary


@dataclass
class CrawlResult:
    """What a crawl run could not do, for its caller to handle."""

    #: gfids of directories that could not be found on the primary where expected.
    unresolved: list[bytes]


class Crawler(Inspectable, pykka.ThreadingActor):
    """Walks the primary brick and feeds the Batcher with what must change."""

    def __init__(self, primary: PrimaryTree, channel: Channel, batcher: Any, ledger: Ledger,
                 credits: Credits, *, dirmap: DirMap | None = None,
                 timeout: float = 600.0, rules: Rules = NO_RULES) -> None:
        super().__init__()
        #: Exclude patterns and ignore-deletes (config keys; actors/reconcile.Rules).
        self.rules = rules
        self.primary = primary
        self.channel = channel
        self.batcher = batcher
        self.ledger = ledger
        self.credits = credits
        self.dirmap = dirmap
        self.timeout = timeout
        self.seen = SeenLinks()
        self.stack: list[_Todo] = []
        self.descend = DESCEND_ALL
        self.force_data: frozenset[bytes] = frozenset()
        self.unresolved: list[bytes] = []
        #: Live: changed files not met yet by this re-check (gfid -> file handle).
        self.objects: dict[bytes, bytes] = {}
        self.done: Future[CrawlResult] | None = None
        self._me: Any = None

    def on_start(self) -> None:
        self._me = self.actor_ref.proxy()

    def on_failure(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc or RuntimeError("crawler failed"))

    def _run(self, todos: list[_Todo], descend: str, force_data: frozenset[bytes],
             done: Future[CrawlResult]) -> None:
        if self.done is not None and not self.done.done():
            done.set_exception(RuntimeError("a crawl is already running"))
            return
        self.stack = list(reversed(todos))
        self.objects = {}
        self.descend = descend
        self.force_data = force_data
        self.unresolved = []
        self.done = done
        self.seen = SeenLinks()
        self._me.step.defer()

    def begin(self, done: Future[CrawlResult]) -> None:
        """Hybrid crawl: the whole brick, from its root."""
        root = self.primary.root_entry()
        row = self.channel.call("stat_gfid", {"gfid": ROOT_GFID}, timeout=self.timeout)
        remote = None if row is None else Remote(b"", ROOT_GFID, *row)
        self._run([_Todo(SubDir(root, b"", remote), None, True)], DESCEND_ALL, frozenset(),
                  done)

    def recheck(self, targets: list[tuple[bytes, list[bytes] | None]],
                force_data: frozenset[bytes], done: Future[CrawlResult],
                objects: list[tuple[bytes, bytes]] | None = None) -> None:
        """Live crawl: re-check these directories (and the new subtrees found in them).

        Each target is (directory gfid, names): only those entries are compared (an
        empty list: the directory's own meta only), or every entry when names is None.
        ``objects`` are (gfid, file handle) of files the journal says changed: those the
        named re-checks do not meet where their records said (changed through a link that
        is gone since, while another link lives on) are compared by handle (_objects).
        Directories the map cannot place on the primary, or that are not where it says,
        come back in the result's ``unresolved`` list.
        """
        todos: list[_Todo] = []
        unresolved: list[bytes] = []
        rows = [(g, names, self.channel.call_async("stat_gfid", {"gfid": g}))
                for g, names in targets]
        for gfid, names, fut in rows:
            row = fut.result(timeout=self.timeout)
            if row is None:
                continue  # not on the secondary yet: its parent's re-check creates it
            relpath = b"" if gfid == ROOT_GFID else (
                self.dirmap.relpath(gfid) if self.dirmap else None)
            if relpath is None:
                unresolved.append(gfid)
                continue
            if self.rules.path_excluded(relpath, True):
                continue  # under an excluded name (replicated before it was excluded)
            entry = self._dir_entry(relpath, gfid)
            if entry is None:
                unresolved.append(gfid)
                continue
            todos.append(_Todo(SubDir(entry, relpath, Remote(entry.name, gfid, *row)),
                               None, True, names=names))
        self._run(todos, DESCEND_NEW, force_data, done)
        self.objects = dict(objects or [])
        self.unresolved.extend(unresolved)

    def _objects(self, objects: list[tuple[bytes, bytes]], force_data: frozenset[bytes]) -> None:
        """Compare files by kernel file handle (gfid, handle): changed files with several
        links whose current name the kernel cannot give.  Data and meta move by gfid."""
        ops: list[dict[str, Any]] = []
        jobs: list[DataJob] = []
        for gfid, handle in objects:
            label = b".gfid/" + gfid.hex().encode()
            try:
                fd = self.primary.open_handle(handle, gfid)
            except OSError as ex:
                self.ledger.fail("data", "open", label, gfid, ex.errno, ex.strerror or str(ex))
                continue
            if fd is None:
                continue  # gone: its names are in E records
            try:
                if self.rules.patterns and self._excluded_fd(fd):
                    continue
                e = self.primary.entry_of_fd(fd, gfid)
            finally:
                os.close(fd)
            row = self.channel.call("stat_gfid", {"gfid": gfid}, timeout=self.timeout)
            if row is None:
                continue  # not on the secondary: the E record of its new name creates it
            r = Remote(b"", gfid, *row)
            if r.size != e.size or r.mtime_ns != e.mtime_ns or gfid in force_data:
                jobs.append(DataJob(e, label, r.size, handle=handle))
            elif meta_differs(e, r):
                ops.append({"op": "meta", "gfid": gfid, "meta": e.meta()})
        if ops or jobs:
            self.ledger.count("linked_by_handle", len(objects))
            credit = self._take_credits(ops, jobs)
            self.batcher.add.defer(ops, [b".gfid/" + op["gfid"].hex().encode() for op in ops],
                                   jobs, [], credit)

    def _take_credits(self, ops: list[dict[str, Any]], jobs: list[DataJob]) -> tuple[int, int]:
        """Wait for room in the in-flight budget (actors/batcher.Credits) for an add."""
        credit = cost(ops, jobs)
        if not self.credits.acquire(*credit, timeout=0):
            # The budget is held by ops in flight and by the Batcher's partial batch: send
            # the latter now, or it would wait for ops that wait for it.
            self.batcher.flush.defer()
            if not self.credits.acquire(*credit, timeout=self.timeout):
                raise TimeoutError("the secondary has not answered ops for too long")
        return credit

    def _dir_entry(self, relpath: bytes, gfid: bytes) -> Entry | None:
        if not relpath:
            return self.primary.root_entry()
        parent, _, name = relpath.rpartition(b"/")
        fd = self.primary.open_dir(parent, self._parent_gfid(gfid))
        if fd is None:
            return None
        try:
            e = self.primary.stat_entry(fd, name)
        except OSError:
            return None
        finally:
            os.close(fd)
        return e if e.gfid == gfid and e.type == "d" else None

    def _parent_gfid(self, gfid: bytes) -> bytes:
        loc = self.dirmap.get(gfid) if self.dirmap else None
        return loc[0] if loc else ROOT_GFID

    def inspect_extra(self) -> dict[str, Any]:
        """The crawl in progress (read from the inspecting thread: reads only)."""
        done = self.done
        return {"crawling": done is not None and not done.done(), "stack": len(self.stack),
                "mode": self.descend, "unresolved": len(self.unresolved)}

    def step(self) -> None:
        """Crawl one directory, then schedule the next."""
        if not self.stack:
            if self.objects:
                self._objects(list(self.objects.items()), self.force_data)
                self.objects = {}
            if self.dirmap is not None:
                self.dirmap.flush()
            if self.done is not None and not self.done.done():
                self.done.set_result(CrawlResult(self.unresolved))
            return
        # Ask for the listings of the next few before taking one (they are often
        # children just found, which no prefetch has asked for yet), so the secondary
        # lists while this side scans.
        self._prefetch()
        todo = self._next()
        self._crawl(todo)
        self._me.step.defer()

    def _request_listing(self, todo: _Todo) -> None:
        if todo.needs_listing and todo.listing is None:
            args: dict[str, Any] = {"gfid": todo.sub.entry.gfid}
            if todo.names is not None:
                args["names"] = todo.names
            todo.listing = self.channel.call_async("list_dir", args)

    def _next(self) -> _Todo:
        """Take the next directory to crawl: the topmost of the prefetch window whose
        listing is already here (or that needs none), else the top of the stack.

        A listing the secondary has not answered yet is often queued behind a large
        one (its lister answers in order): crawling a directory that is ready meanwhile
        keeps both sides busy.  Every directory on the stack has had its parent planned,
        so any of them may go first; taking from the top few keeps the walk depth-first
        and the stack as small as before.
        """
        stack = self.stack
        for i in range(len(stack) - 1, max(len(stack) - PREFETCH, 0) - 1, -1):
            t = stack[i]
            if not t.needs_listing or (t.listing is not None and t.listing.done()):
                return stack.pop(i)
        return stack.pop()

    def _prefetch(self) -> None:
        for todo in self.stack[-PREFETCH:]:
            self._request_listing(todo)

    def _listing(self, todo: _Todo) -> list[Remote]:
        if not todo.needs_listing:
            return []
        self._request_listing(todo)
        assert todo.listing is not None
        if todo.ordered and not todo.listing.done():
            self.batcher.flush.defer()  # it waits behind ops still in the Batcher
        try:
            reply = todo.listing.result(timeout=self.timeout)
        except NotFound:
            return []  # not on the secondary (its ensure failed): the failure is in the ledger
        return [Remote.from_row(r) for r in reply["entries"]]

    def _listing_or_failure(self, todo: _Todo) -> list[Remote] | None:
        """The secondary's listing of ``todo``, or None after recording why it has none.

        A directory the secondary cannot list (EIO, EACCES: its file system's trouble, sent
        back as OSError) is a failure of that directory, retried like any other, and its
        subtree waits: planning without the listing would miss deletions and renames.
        """
        try:
            return self._listing(todo)
        except OSError as e:
            d = todo.sub.entry
            self.ledger.fail("entry", "list", todo.sub.relpath or b".", d.gfid, e.errno,
                             f"secondary cannot list it: {e.strerror or e}", pgfid=d.gfid)
            return None

    def _crawl(self, todo: _Todo) -> None:
        sub = todo.sub
        d = sub.entry
        fd = self.primary.open_dir(sub.relpath, d.gfid)
        if fd is None:
            self.ledger.count("dirs_vanished")
            if self.descend == DESCEND_NEW:
                self.unresolved.append(d.gfid)  # moved since it was placed: look again
            return
        try:
            if todo.names is None and sub.remote is None and not todo.needs_listing:
                todos = self._crawl_new(fd, sub)
            else:
                todos = self._crawl_known(fd, todo)
        finally:
            os.close(fd)
        self.stack.extend(reversed(todos))

    def _crawl_known(self, fd: int, todo: _Todo) -> list[_Todo]:
        """Crawl a directory the secondary has (or may have): compare the two listings.
        Returns the subdirectories to crawl."""
        sub = todo.sub
        d = sub.entry
        if todo.names is None:
            entries, problems = self.primary.list_dir(fd, is_root=not sub.relpath)
        else:
            entries, problems = self._named(fd, todo.names, is_root=not sub.relpath)
        self._scan_problems(sub, problems)
        remote = self._listing_or_failure(todo)
        if remote is None:
            return []
        plan = plan_dir(d.gfid, sub.relpath, entries, remote, self.seen,
                        force_data=self.force_data, rules=self.rules)
        self._planned(d, entries, plan)
        self.ledger.count("dirs_scanned")
        todos, listings = self._subdir_todos(plan)
        self._send_plan(fd, sub, plan, listings)
        return todos

    def _crawl_new(self, fd: int, sub: SubDir) -> list[_Todo]:
        """Crawl a directory the secondary does not have yet (it is created empty by its
        parent's ops): nothing there to compare with, so it is read, planned and sent in
        parts of ``ADD_SLICE`` names, and the secondary starts on the first part of a
        5,000-file directory while this side still reads the rest.  The directory's own
        meta follows its last part.  Returns the subdirectories to crawl."""
        d = sub.entry
        todos: list[_Todo] = []
        for entries, problems in self.primary.iter_dir(fd, is_root=not sub.relpath,
                                                       size=ADD_SLICE):
            self._scan_problems(sub, problems)
            plan = plan_dir(d.gfid, sub.relpath, entries, [], self.seen,
                            force_data=self.force_data, rules=self.rules)
            self._planned(d, entries, plan)
            part_todos, listings = self._subdir_todos(plan)
            todos.extend(part_todos)
            self._send_plan(fd, sub, plan, listings, final=False)
        self.ledger.count("dirs_scanned")
        self._send_plan(fd, sub, Plan(), [])
        return todos

    def _scan_problems(self, sub: SubDir, problems: list[tuple[bytes, str]]) -> None:
        """Record the entries of ``sub`` that could not be read on the primary."""
        for name, reason in problems:
            self.ledger.fail("entry", "scan", _join(sub.relpath, name), None, None, reason,
                             pgfid=sub.entry.gfid)

    def _planned(self, d: Entry, entries: list[Entry], plan: Plan) -> None:
        """Bookkeeping of a planned directory (or part of one)."""
        if self.dirmap is not None:
            for s in plan.subdirs:
                self.dirmap.set(s.entry.gfid, d.gfid, s.entry.name)
        if self.objects:
            for e in entries:
                self.objects.pop(e.gfid, None)
        self.ledger.count("scanned", len(entries))

    def _send_plan(self, fd: int, sub: SubDir, plan: Plan,
                   listings: list[tuple[bytes, Future[Any]]], *, final: bool = True) -> None:
        """Read the inline data of ``plan`` and hand its ops to the Batcher.

        A large directory goes in slices of ``ADD_SLICE`` ops, each sent once its files
        are read: the secondary starts on the first slice of a 5,000-file directory
        while this side still reads the rest.  The data jobs without an ensure and the
        listings that must follow its ops go with the last slice, and so does the
        directory's meta when ``final`` (the plan is the directory's last part).
        """
        d = sub.entry
        n = len(plan.ops)
        if not final and not n and not plan.data and not listings:
            return
        meta_needed = final and dir_meta_needed(d, sub.remote, plan)
        loose = [j for j in plan.data if j.ensure_index is None]
        start = 0
        while True:
            end = min(start + ADD_SLICE, n)
            last = end == n
            part = Plan(ops=plan.ops[start:end],
                        want_data=[i - start for i in plan.want_data if start <= i < end])
            for job in plan.data:
                if job.ensure_index is not None and start <= job.ensure_index < end:
                    job.ensure_index -= start
                    part.data.append(job)
            self._read_inline(fd, sub.relpath, part)
            ops = part.ops
            paths = [_join(sub.relpath, op.get("name", b"")) for op in ops]
            if last:
                part.data.extend(loose)
                if meta_needed:
                    ops.append({"op": "meta", "gfid": d.gfid, "meta": d.meta()})
                    paths.append(sub.relpath or b".")
            credit = self._take_credits(ops, part.data)
            self.batcher.add.defer(ops, paths, part.data, listings if last else None, credit)
            if last:
                break
            start = end
        if final and self.descend == DESCEND_NEW and (n or meta_needed):
            # Live: send this directory's ops now rather than after the whole re-check (a
            # renamed directory's new name shows before its contents are compared).
            self.batcher.flush.defer()

    def _excluded_fd(self, fd: int) -> bool:
        """True when the file's current path (as the kernel names it) is excluded; a
        file the kernel cannot name below the root is treated as excluded (not sent)."""
        path = os.readlink(b"/proc/self/fd/%d" % fd)
        root = os.readlink(b"/proc/self/fd/%d" % self.primary.root_fd)
        if not path.startswith(root + b"/"):
            return True
        return self.rules.path_excluded(path[len(root) + 1:], False)

    def _named(self, fd: int, names: list[bytes], *,
               is_root: bool) -> tuple[list[Entry], list[tuple[bytes, str]]]:
        """The entries of ``names`` that exist in the open directory, as ``list_dir`` would
        report them (a name not there any more is simply absent: the plan removes it)."""
        entries: list[Entry] = []
        problems: list[tuple[bytes, str]] = []
        for name in names:
            if is_root and name == META_DIR:
                continue
            try:
                entries.append(self.primary.stat_entry(fd, name))
            except FileNotFoundError:
                continue
            except OSError as e:
                problems.append((name, f"{os.strerror(e.errno or 0)} (errno {e.errno})"))
        entries.sort(key=lambda e: e.name)
        return entries, problems

    def _subdir_todos(self, plan: Plan) -> tuple[list[_Todo], list[tuple[bytes, Future[Any]]]]:
        """What to crawl next, and which listings must follow this directory's ops.

        In place: listed out of band.  Known elsewhere on the secondary (a rename into
        place): listed out of band too, by gfid, wherever it is now.  Adopted: listed in
        order, after the ensure that gives it its gfid.  Otherwise it is created empty.
        Whether a new subdirectory is known elsewhere takes a ``lookup`` round trip,
        except for one whose gfid was minted while listing it (every directory of a
        first sync): no secondary can know that gfid.
        """
        new = [s for s in plan.subdirs if s.remote is None and not s.adopt
               and not s.entry.minted]
        known: set[bytes] = set()
        if new:
            self.ledger.count("lookups")
            found = self.channel.call("lookup", {"gfids": [s.entry.gfid for s in new]},
                                      timeout=self.timeout)
            known = {s.entry.gfid for s, t in zip(new, found, strict=True) if t is not None}
        todos: list[_Todo] = []
        listings: list[tuple[bytes, Future[Any]]] = []
        for s in plan.subdirs:
            if self.descend == DESCEND_NEW and s.remote is not None:
                continue  # in place: its own changes are in the journal
            if s.adopt:
                fut: Future[Any] = Future()
                listings.append((s.entry.gfid, fut))
                todos.append(_Todo(s, fut, True, ordered=True))
            else:
                todos.append(_Todo(s, None, s.remote is not None or s.entry.gfid in known))
        return todos, listings

    def _read_inline(self, dir_fd: int, relpath: bytes, plan: Plan) -> None:
        """Attach the content of small files to their ensure ops (dropping vanished ones).

        The files are taken ``READ_WINDOW`` at a time: all opened and their reads started
        (``_open_ahead``) before the first is read, so that a tree that is not in the
        page cache is read with many requests in flight instead of one file at a time.
        """
        drop: list[int] = []
        want = plan.want_data
        for w in range(0, len(want), READ_WINDOW):
            window = want[w:w + READ_WINDOW]
            opened = _open_ahead(dir_fd, [plan.ops[i]["name"] for i in window])
            try:
                for i, fd in zip(window, opened, strict=True):
                    if not self._read_one(dir_fd, relpath, plan, i, fd):
                        drop.append(i)
            finally:
                for fd in opened:
                    if fd is not None:
                        os.close(fd)
        if drop:
            keep = [i for i in range(len(plan.ops)) if i not in set(drop)]
            remap = {old: new for new, old in enumerate(keep)}
            plan.ops = [plan.ops[i] for i in keep]
            for job in plan.data:
                if job.ensure_index is not None:
                    job.ensure_index = remap.get(job.ensure_index)

    def _read_one(self, dir_fd: int, relpath: bytes, plan: Plan, i: int,
                  fd: int | None) -> bool:
        """Inline the content of ``plan.ops[i]`` (read from ``fd`` when it was opened
        ahead), or turn it into a data job; False when the op must be dropped."""
        op = plan.ops[i]
        try:
            check_read(_join(relpath, op["name"]))  # test-only fault point
            data, st = _read_small(dir_fd, op["name"], op["gfid"], fd)
        except OSError as e:
            self.ledger.fail("data", "read", _join(relpath, op["name"]), op["gfid"],
                             e.errno, e.strerror or str(e), pgfid=op.get("pgfid"))
            return False
        if data is None or st is None:
            return False  # replaced or removed since listed: seen by the next pass
        if len(data) > INLINE_HARD_MAX or _has_hole(dir_fd, op["name"], st):
            # It grew since we listed it, or it has holes (inline data would fill them):
            # the data path sends its extents after the ensure, then applies its meta.
            # The ensure must not carry the meta: an mtime set before the data would
            # make a kept file look already up to date.
            plan.data.append(DataJob(_refresh(op, st), _join(relpath, op["name"]), None, i,
                                     pgfid=op["pgfid"]))
            op.pop("meta", None)
            return True
        op["data"] = data
        op["meta"]["mtime"], op["meta"]["atime"] = st.st_mtime_ns, st.st_atime_ns
        return True


def _refresh(op: dict[str, Any], st: os.stat_result) -> Entry:
    m = op["meta"]
    return Entry(op["name"], op["gfid"], "f", m["mode"], m["uid"], m["gid"], st.st_size,
                 st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, st.st_ino,
                 0, None, m.get("xattrs", {}))


def _has_hole(dir_fd: int, name: bytes, st: os.stat_result) -> bool:
    """True when the file has a hole before its end (SEEK_HOLE).

    ``st_blocks`` cannot tell: a file just written under delayed allocation has no
    blocks yet.  SEEK_HOLE counts delayed data as data.  Only asked for files that look
    sparse by their block count, so the common case costs no syscall.
    """
    if st.st_size == 0 or st.st_blocks * 512 >= st.st_size:
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return False  # gone: the next pass sees it; inline is what we have
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < st.st_size
    except OSError:
        return False
    finally:
        os.close(fd)


def _join(relpath: bytes, name: bytes) -> bytes:
    return relpath + b"/" + name if relpath else name


_SMALL_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOATIME


def _open_small(dir_fd: int, name: bytes) -> int:
    """Open a file to read it inline: never following a symlink, never blocking on a
    FIFO that took the name, without touching its atime where we may."""
    try:
        return os.open(name, _SMALL_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, _SMALL_FLAGS & ~os.O_NOATIME, dir_fd=dir_fd)


def _open_ahead(dir_fd: int, names: list[bytes]) -> list[int | None]:
    """Open ``names`` and ask the kernel to start reading each (``POSIX_FADV_WILLNEED``).

    Reading small files one after the other from a cold cache waits for the disk once
    per file; starting all reads first lets the device work on many at once (19,159
    small files of the benchmark tree, read cold on this VM: 1.6-1.9 s one at a time,
    0.33-0.38 s this way).  A name that cannot be opened here gets None: ``_read_small``
    opens it again and reports what happens then.
    """
    fds: list[int | None] = []
    for name in names:
        try:
            fd = _open_small(dir_fd, name)
        except OSError:
            fds.append(None)
            continue
        fds.append(fd)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # not a regular file any more (_read_small checks), or no advice here
    return fds


def _read_small(dir_fd: int, name: bytes, gfid: bytes,
                opened: int | None = None) -> tuple[bytes | None, os.stat_result | None]:
    """Content of a small file if it is still ``gfid``; re-read if it changed meanwhile.

    ``opened``: the file already open (by ``_open_ahead``; the caller closes it).
    """
    if opened is not None:
        fd = opened
    else:
        try:
            fd = _open_small(dir_fd, name)
        except FileNotFoundError:
            return None, None
    try:
        for _ in range(3):
            st0 = os.fstat(fd)
            if not stat.S_ISREG(st0.st_mode) or gfids.read_gfid(fd, st0.st_ino) != gfid:
                return None, None
            chunks = []
            off = 0
            while True:
                want = max(st0.st_size - off, 0) + 65536
                b = os.pread(fd, want, off)
                if not b:
                    break
                chunks.append(b)
                off += len(b)
                if off > INLINE_HARD_MAX:
                    break
                if len(b) < want and off >= st0.st_size:
                    # Short read past the size seen: end of file, no second pread to learn
                    # it (a file that changes meanwhile fails the fstat comparison below).
                    break
            st1 = os.fstat(fd)
            if (st1.st_size, st1.st_mtime_ns, st1.st_ctime_ns) == (
                    st0.st_size, st0.st_mtime_ns, st0.st_ctime_ns):
                return b"".join(chunks), st1
        # Stamping the last mtime on content read before it would hide the change forever.
        raise OSError(errno.EAGAIN, "file kept changing while being read")
    finally:
        if opened is None:
            os.close(fd)
