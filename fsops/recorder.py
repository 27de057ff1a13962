"""The Recorder: watches a primary brick and appends change records to the journal.

fanotify (root) marks the whole filesystem with FID reporting; events are filtered to the
brick and mapped to journal records (see docs/journal.md).  Without fanotify the recorder
falls back to recursive inotify.  One reader thread reads, maps, coalesces (a short
window, dedup of identical records) and appends.  Events merge in the kernel queue and
lose their order, so records say *which* name or object changed, never what happened.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet

from fsops import fanotify as fan
from fsops import gfid as gfids
from fsops import inotify as ino
from fsops import xattrs
from fsops.constants import GFID_XATTR, META_DIR, ROOT_GFID
from fsops.journal import OVERFLOW, START, STOP, JournalWriter, Record
from fsops.resolve import open_beneath

log = logging.getLogger(__name__)

Emit = Callable[[Record], None]

_FAN_INIT = (fan.FAN_CLASS_NOTIF | fan.FAN_CLOEXEC | fan.FAN_NONBLOCK | fan.FAN_REPORT_DFID_NAME
             | fan.FAN_REPORT_FID | fan.FAN_REPORT_TARGET_FID)
_FAN_MASK = (fan.FAN_CREATE | fan.FAN_DELETE | fan.FAN_MOVED_FROM | fan.FAN_MOVED_TO
             | fan.FAN_RENAME | fan.FAN_MODIFY | fan.FAN_CLOSE_WRITE | fan.FAN_ATTRIB
             | fan.FAN_DELETE_SELF | fan.FAN_MOVE_SELF | fan.FAN_ONDIR)
_FAN_ENTRY = fan.FAN_CREATE | fan.FAN_DELETE | fan.FAN_MOVED_FROM | fan.FAN_MOVED_TO
_FAN_DATA = fan.FAN_MODIFY | fan.FAN_CLOSE_WRITE
#: inotify: how long a MOVED_FROM waits for its MOVED_TO across reads (seconds).
MOVE_PAIR_WAIT = 0.02
_IN_MASK = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_MODIFY
            | ino.IN_CLOSE_WRITE | ino.IN_ATTRIB | ino.IN_DELETE_SELF | ino.IN_MOVE_SELF
            | ino.IN_ONLYDIR | ino.IN_EXCL_UNLINK)  # no IN_DONT_FOLLOW: we watch /proc/self/fd/N
_IN_ENTRY = ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO
_READ_SIZE = 1 << 18
_STALE = (errno.ESTALE, errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def _queue_flag() -> int:
    """FAN_UNLIMITED_QUEUE unless GEOREP_RECORDER_BOUNDED_QUEUE=1.

    The mark covers the whole filesystem, so a secondary (or anything else) writing on the
    same filesystem fills the queue too; at the default 16,384 events a burst overflows it
    and forces a hybrid crawl, which writes more: a loop on a busy machine.  The unlimited
    queue (root only, which fanotify needs anyway) trades kernel memory for no overflow;
    the bounded one is kept for tests that provoke an overflow on purpose.
    """
    return 0 if os.environ.get("GEOREP_RECORDER_BOUNDED_QUEUE") == "1" else \
        fan.FAN_UNLIMITED_QUEUE


class RecorderError(Exception):
    """The recorder cannot watch the brick (no fanotify and no inotify, brick missing)."""


def fanotify_available() -> str | None:
    """None when fanotify in FID mode can be used here, else the reason it cannot."""
    try:
        fd = fan.init(_FAN_INIT)
    except OSError as e:
        return f"fanotify_init: {os.strerror(e.errno or 0)}"
    os.close(fd)
    return None


def _decode_gfid(raw: bytes | None, ino_: int) -> bytes | None:
    # Same rule as fsops.gfid.read_gfid (gfid + little-endian st_ino, or a bare 16 bytes).
    if raw is None:
        return None
    if len(raw) == 24 and int.from_bytes(raw[16:], "little") == ino_:
        return raw[:16]
    return raw if len(raw) == 16 else None


class _Brick:
    """The brick root: its path, device, and the gfid lookups both backends share."""

    def __init__(self, root: bytes) -> None:
        self.root = os.path.realpath(os.fsencode(root))
        try:
            self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise RecorderError(f"brick {os.fsdecode(self.root)!r}: {os.strerror(e.errno or 0)}")
        st = os.fstat(self.fd)
        self.dev, self.ino = st.st_dev, st.st_ino
        self.prefix = self.root.rstrip(b"/") + b"/"
        self.meta = self.prefix + META_DIR

    def inside(self, path: bytes) -> bool:
        """True for the root and paths below it, except the private ``.georep`` subtree."""
        if path == self.root:
            return True
        if not path.startswith(self.prefix):
            return False
        return not (path == self.meta or path.startswith(self.meta + b"/"))

    def dir_gfid(self, fd: int, st: os.stat_result) -> bytes:
        """gfid of an open directory of the brick, assigned if it has none yet."""
        if st.st_ino == self.ino and st.st_dev == self.dev:
            return ROOT_GFID
        return gfids.ensure_gfid(fd, st.st_ino)

    def close(self) -> None:
        os.close(self.fd)


class _Fanotify:
    """fanotify backend: a filesystem mark, events mapped through file handles."""

    name = "fanotify"

    def __init__(self, brick: _Brick, exclude_pids: AbstractSet[int], counters: dict[str, int],
                 cache_size: int) -> None:
        self.brick = brick
        self.exclude = exclude_pids
        self.c = counters
        self.cache_size = cache_size
        #: dir handle -> (gfid, or b"" when not in the brick; generation of the answer)
        self.dirs: collections.OrderedDict[bytes, tuple[bytes, int]] = (
            collections.OrderedDict())
        self.gen = 0
        self.root_handle = fan.name_to_handle_at(brick.root)
        self.fd = fan.init(_FAN_INIT | _queue_flag())
        try:
            fan.mark(self.fd, fan.FAN_MARK_ADD | fan.FAN_MARK_FILESYSTEM, _FAN_MASK, brick.root)
        except OSError:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)

    def read(self, ts: int, emit: Emit) -> int:
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return 0
        n = 0
        for ev in fan.parse(data):
            n += 1
            if ev.mask & fan.FAN_Q_OVERFLOW:
                emit(Record.marker(OVERFLOW, ts))
                continue
            if ev.pid in self.exclude:
                self.c["dropped"] += 1
                continue
            try:
                if not self._event(ev, ts, emit):
                    self.c["dropped"] += 1
            except OSError as e:
                # An event we could not map (e.g. open_by_handle_at: ENOMEM under heavy
                # load) is a hole in the history, never the recorder's death: a gap
                # marker makes the worker walk the tree (Hybrid Crawl) instead.
                log.warning("cannot map a change event (%s): marking a gap in the journal", e)
                self.c["unmapped"] = self.c.get("unmapped", 0) + 1
                emit(Record.marker(OVERFLOW, ts))
        self.c["events"] += n
        return n

    # -- handles ---------------------------------------------------------------------

    def _dir(self, handle: bytes | None) -> bytes | None:
        """gfid of a directory handle in the brick; None if outside, gone or unreadable."""
        return self._dir_raw(handle) or None

    def _dir_raw(self, handle: bytes | None) -> bytes | None:
        """Like :meth:`_dir`, but b"" for "outside the brick" and None for "unknown"."""
        if handle is None:
            return None
        hit = self.dirs.get(handle)
        if hit is not None:
            self.dirs.move_to_end(handle)
            if hit[1] == self.gen:
                return hit[0]
        value = self._resolve_dir(handle)
        if value is None:
            # Gone (removed before we read its events): its gfid and place do not change
            # any more, so the last answer stands: the events in it are still recorded.
            return hit[0] if hit is not None else None
        self.dirs[handle] = (value, self.gen)
        if len(self.dirs) > self.cache_size:
            self.dirs.popitem(last=False)
        return value

    def _resolve_dir(self, handle: bytes) -> bytes | None:
        """gfid (b"" when outside the brick) of a directory handle; None when gone."""
        try:
            fd = fan.open_by_handle_at(self.brick.fd, handle, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            if e.errno in _STALE:
                return None
            raise
        path = b"?"
        try:
            st = os.fstat(fd)
            path = os.readlink(b"/proc/self/fd/%d" % fd)
            if st.st_nlink == 0:
                return None  # removed, still open somewhere: its path is "... (deleted)"
            if st.st_dev != self.brick.dev or not self.brick.inside(path):
                return b""
            return self.brick.dir_gfid(fd, st)
        except OSError as e:
            log.warning("cannot read gfid of directory %r: %s", path, e)
            return None
        finally:
            os.close(fd)

    def _object(self, handle: bytes | None) -> bytes | None:
        """gfid of an object (not assigned here); None if it has none or is gone."""
        if handle is None:
            return None
        if handle == self.root_handle:
            return ROOT_GFID
        try:
            fd = fan.open_by_handle_at(self.brick.fd, handle, os.O_PATH)
        except OSError as e:
            if e.errno in _STALE:
                return None
            raise
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return self._dir(handle)
            if gfids.xattrless(st.st_mode):
                return gfids.derived_at(fd, st)
            # fgetxattr is EBADF on an O_PATH fd; the magic link reaches the object without
            # opening it (an open would break leases, e.g. Samba oplocks, and could block).
            try:
                raw = os.getxattr(b"/proc/self/fd/%d" % fd, GFID_XATTR)
            except OSError as e:
                if e.errno in (errno.ENODATA, errno.ENOTSUP, *_STALE):
                    return None
                raise
            return _decode_gfid(raw, st.st_ino)
        finally:
            os.close(fd)

    def _dir_moved(self) -> None:
        # A directory moved into, out of or within the brick: the inside/outside answer of
        # its whole subtree may have changed.  Every cached answer is re-checked once
        # (gfids never change, so a directory that is gone by then keeps its last answer).
        self.gen += 1

    # -- mapping ---------------------------------------------------------------------

    def _event(self, ev: fan.Event, ts: int, emit: Emit) -> bool:
        m = ev.mask
        ondir = bool(m & fan.FAN_ONDIR)
        if m & fan.FAN_RENAME:
            return self._rename(ev, ts, emit)
        out = False
        if m & _FAN_ENTRY and ev.name not in (None, b"."):
            pg = self._dir(ev.dfid)
            if pg is not None and ev.name and not (pg == ROOT_GFID and ev.name == META_DIR):
                emit(Record.entry(ts, pg, ev.name))
                out = True
        if m & (_FAN_DATA | fan.FAN_ATTRIB):
            g = self._changed_object(ev, ts, emit)
            if g is not None:
                # The parent and name tell the live crawl which directory to re-check.
                # A directory's own change is reported for the directory itself: the live
                # crawl re-checks it (its meta is compared when it is crawled, not in its
                # parent's listing).
                pg = None
                if ev.name not in (None, b".") and ev.dfid is not None and not ondir:
                    pg = self._dir(ev.dfid)
                where = (pg, ev.name) if pg is not None else (None, None)
                # A file may live on under another link once this name is gone: its
                # handle lets the worker reach it without a name (docs/journal.md).
                h = ev.fid if not ondir and g != ROOT_GFID else None
                if m & _FAN_DATA and not ondir:
                    emit(Record.data(ts, g, where[0], where[1], handle=h))
                if m & fan.FAN_ATTRIB:
                    emit(Record.meta(ts, g, where[0], where[1], handle=h))
                out = True
        return out

    def _changed_object(self, ev: fan.Event, ts: int, emit: Emit) -> bytes | None:
        """gfid for a data/meta event; an object without gfid becomes an ``E`` of its name."""
        if ev.name == b".":
            return self._dir(ev.dfid)  # an event on a directory itself
        if ev.dfid is None:
            # the object's own copy of a child event (the parent's copy carries the name)
            return ROOT_GFID if ev.fid == self.root_handle else None
        pg = self._dir(ev.dfid)
        if pg is None:
            return ROOT_GFID if ev.fid == self.root_handle else None
        g = self._object(ev.fid)
        if g is None and ev.name and not (pg == ROOT_GFID and ev.name == META_DIR):
            emit(Record.entry(ts, pg, ev.name))  # unknown to replication: re-check the name
        return g

    def _rename(self, ev: fan.Event, ts: int, emit: Emit) -> bool:
        op, np_ = self._dir_raw(ev.old_dfid), self._dir_raw(ev.new_dfid)
        if ev.mask & fan.FAN_ONDIR and (op != b"" or np_ != b""):
            self._dir_moved()  # not when both ends are known to be outside the brick
        op, np_ = op or None, np_ or None
        if op is not None and op == ROOT_GFID and ev.old_name == META_DIR:
            op = None
        if np_ is not None and np_ == ROOT_GFID and ev.new_name == META_DIR:
            np_ = None
        if op is not None and np_ is not None and ev.old_name and ev.new_name:
            emit(Record.rename(ts, op, ev.old_name, np_, ev.new_name, self._object(ev.fid)))
        elif op is not None and ev.old_name:
            emit(Record.entry(ts, op, ev.old_name))  # moved out of the brick
        elif np_ is not None and ev.new_name:
            emit(Record.entry(ts, np_, ev.new_name))  # moved in from outside
        else:
            return False
        return True


class _Watch:
    __slots__ = ("gfid", "rel")

    def __init__(self, gfid: bytes, rel: bytes) -> None:
        self.gfid = gfid
        self.rel = rel


class _Inotify:
    """Recursive inotify backend: one watch per directory, new directories scanned."""

    name = "inotify"

    def __init__(self, brick: _Brick, counters: dict[str, int], cache_size: int) -> None:
        self.brick = brick
        self.c = counters
        self.cache_size = cache_size
        self.watches: dict[int, _Watch] = {}
        self.fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        #: (dev, ino) -> replicated-meta signature, to drop ATTRIB events that changed
        #: nothing replicated (our own gfid xattrs: inotify cannot tell who did it).
        self.sigs: collections.OrderedDict[tuple[int, int], tuple[object, ...]] = (
            collections.OrderedDict())
        self.moves: dict[int, tuple[_Watch, bytes, bool]] = {}
        #: When each pending MOVED_FROM was read (its MOVED_TO may come in the next read).
        self.move_at: dict[int, float] = {}
        self.fd = ino.init()
        self._watch_tree(b"", None, 0)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.fd)

    def _dirfd(self, wd: int) -> int | None:
        fd = self.fds.get(wd)
        if fd is not None:
            self.fds.move_to_end(wd)
            return fd
        w = self.watches.get(wd)
        if w is None:
            return None
        try:
            fd = open_beneath(self.brick.fd, w.rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        self.fds[wd] = fd
        if len(self.fds) > 256:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def _watch_tree(self, rel: bytes, emit: Emit | None, ts: int) -> None:
        """Watch ``rel`` and every directory below; with ``emit``, record what is inside."""
        stack = [rel]
        while stack:
            cur = stack.pop()
            try:
                fd = open_beneath(self.brick.fd, cur, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                wd = ino.add_watch(self.fd, b"/proc/self/fd/%d" % fd, _IN_MASK)
                st = os.fstat(fd)
                g = self.brick.dir_gfid(fd, st)
                self._remember_sig(fd, st)
                self.watches[wd] = _Watch(g, cur)
                with os.scandir(fd) as it:
                    entries = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False))
                               for e in it]
            except OSError as e:
                log.warning("inotify: cannot watch %r: %s", cur, e)
                continue
            finally:
                os.close(fd)
            for name, is_dir in entries:
                if not cur and name == META_DIR:
                    continue
                if emit is not None:
                    emit(Record.entry(ts, g, name))
                if is_dir:
                    stack.append(cur + b"/" + name if cur else name)

    def _remember_sig(self, fd: int | bytes, st: os.stat_result, dir_fd: int | None = None
                      ) -> bool:
        """Store the object's replicated-meta signature; True when it changed."""
        attrs = xattrs.read_replicated(fd, dir_fd=dir_fd)
        sig = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, xattrs.digest(attrs))
        key = (st.st_dev, st.st_ino)
        changed = self.sigs.get(key) != sig
        self.sigs[key] = sig
        self.sigs.move_to_end(key)
        if len(self.sigs) > self.cache_size:
            self.sigs.popitem(last=False)
        return changed

    def read(self, ts: int, emit: Emit) -> int:
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            self._flush_moves(ts, emit)
            return 0
        n = 0
        for ev in ino.parse(data):
            n += 1
            if not self._event(ev, ts, emit):
                self.c["dropped"] += 1
        self.c["events"] += n
        return n

    def _rel(self, w: _Watch, name: bytes) -> bytes:
        return w.rel + b"/" + name if w.rel else name

    def _event(self, ev: ino.Event, ts: int, emit: Emit) -> bool:
        m = ev.mask
        if m & ino.IN_Q_OVERFLOW:
            emit(Record.marker(OVERFLOW, ts))
            return True
        if m & ino.IN_IGNORED:
            self.watches.pop(ev.wd, None)
            fd = self.fds.pop(ev.wd, None)
            if fd is not None:
                os.close(fd)
            return False
        w = self.watches.get(ev.wd)
        if w is None:
            return False
        if ev.name and not w.rel and ev.name == META_DIR:
            return False
        isdir = bool(m & ino.IN_ISDIR)
        out = False
        if m & _IN_ENTRY and ev.name:
            emit(Record.entry(ts, w.gfid, ev.name))
            out = True
            if m & ino.IN_MOVED_FROM:
                self.moves[ev.cookie] = (w, ev.name, isdir)
                self.move_at[ev.cookie] = time.monotonic()
            if m & ino.IN_MOVED_TO:
                self._moved_to(ev, w, isdir, ts, emit)
            elif m & ino.IN_CREATE and isdir:
                self._watch_tree(self._rel(w, ev.name), emit, ts)
        if m & (ino.IN_MODIFY | ino.IN_CLOSE_WRITE | ino.IN_ATTRIB):
            out = self._changed(ev, w, ts, emit) or out
        return out

    def _changed(self, ev: ino.Event, w: _Watch, ts: int, emit: Emit) -> bool:
        dfd = self._dirfd(ev.wd)
        if dfd is None:
            return False
        try:
            if ev.name:
                st = os.stat(ev.name, dir_fd=dfd, follow_symlinks=False)
                g = gfids.read_gfid(ev.name, st.st_ino, dir_fd=dfd, st=st)
                if g is None:
                    emit(Record.entry(ts, w.gfid, ev.name))
                    return True
                target: int | bytes = ev.name
                where: tuple[bytes | None, bytes | None] = (
                    (None, None) if stat.S_ISDIR(st.st_mode) else (w.gfid, ev.name))
            else:
                st = os.fstat(dfd)
                g, target = w.gfid, dfd
                where = (None, None)
            out = False
            if ev.mask & (ino.IN_MODIFY | ino.IN_CLOSE_WRITE) and not stat.S_ISDIR(st.st_mode):
                emit(Record.data(ts, g, *where))
                out = True
            if ev.mask & ino.IN_ATTRIB and self._remember_sig(
                    target, st, dir_fd=dfd if ev.name else None):
                emit(Record.meta(ts, g, *where))
                out = True
            return out
        except OSError as e:
            if e.errno in _STALE:
                return False
            raise

    def _moved_to(self, ev: ino.Event, w: _Watch, isdir: bool, ts: int, emit: Emit) -> None:
        src = self.moves.pop(ev.cookie, None)
        self.move_at.pop(ev.cookie, None)
        new_rel = self._rel(w, ev.name)
        g = None
        dfd = self._dirfd(ev.wd)
        if dfd is not None:
            try:
                st = os.stat(ev.name, dir_fd=dfd, follow_symlinks=False)
                g = gfids.read_gfid(ev.name, st.st_ino, dir_fd=dfd, st=st)
            except OSError:
                pass
        if src is None:
            if isdir:
                self._watch_tree(new_rel, emit, ts)  # moved in from outside: all of it is new
            return
        ow, oname, _ = src
        emit(Record.rename(ts, ow.gfid, oname, w.gfid, ev.name, g))
        if isdir:
            old_rel = self._rel(ow, oname)
            old_prefix = old_rel + b"/"
            for watch in self.watches.values():
                if watch.rel == old_rel:
                    watch.rel = new_rel
                elif watch.rel.startswith(old_prefix):
                    watch.rel = new_rel + watch.rel[len(old_rel):]

    def _flush_moves(self, ts: int, emit: Emit) -> None:
        """MOVED_FROM with no MOVED_TO once the queue is empty: moved out of the brick.

        The kernel queues a rename's two events one after the other, so a read may end
        between them: a MOVED_FROM younger than MOVE_PAIR_WAIT waits for the next read.
        (Its ``E`` record is already out; only the pairing and the watches wait.)
        """
        now = time.monotonic()
        for cookie, (w, name, isdir) in list(self.moves.items()):
            if now - self.move_at.get(cookie, 0.0) < MOVE_PAIR_WAIT:
                continue
            del self.moves[cookie]
            self.move_at.pop(cookie, None)
            if isdir:
                prefix = self._rel(w, name)
                for wd, watch in list(self.watches.items()):
                    if watch.rel == prefix or watch.rel.startswith(prefix + b"/"):
                        ino.rm_watch(self.fd, wd)


class Recorder:
    """Records the changes of one brick into a journal, from a reader thread.

    ``exclude_pids``: events caused by these processes are dropped (fanotify only:
    inotify cannot tell who acted).  ``on_records(records)`` is called from the reader
    thread after each append.  ``backend``: ``"auto"`` (fanotify if possible, else
    inotify), ``"fanotify"`` or ``"inotify"``.
    """

    def __init__(self, brick_root: bytes, writer: JournalWriter, *,
                 exclude_pids: Iterable[int] = (os.getpid(),),
                 on_records: Callable[[list[Record]], None] | None = None,
                 backend: str = "auto", window: float = 0.02, max_pending: int = 1000,
                 cache_size: int = 65536) -> None:
        if backend not in ("auto", "fanotify", "inotify"):
            raise ValueError(f"unknown recorder backend {backend!r}")
        self.brick = _Brick(brick_root)
        self.writer = writer
        # A set given by the caller stays live: pids added to it later are excluded too
        # (the recorder daemon learns the pid of each new sync worker).
        self.exclude: AbstractSet[int] = (exclude_pids if isinstance(exclude_pids, set)
                                          else frozenset(exclude_pids))
        self.on_records = on_records
        self.want = backend
        self.window = window
        self.max_pending = max_pending
        self.cache_size = cache_size
        self.backend: _Fanotify | _Inotify | None = None
        self._c = {"events": 0, "records": 0, "overflows": 0, "dropped": 0, "merged": 0}
        self._pending: dict[tuple[object, ...], Record] = {}
        self._pending_since = 0.0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._running = threading.Event()  # cleared by pause()
        self._running.set()
        self._cond = threading.Condition()
        self._drained_at = 0
        self._sync_wanted = 0
        self._error: BaseException | None = None

    @property
    def backend_name(self) -> str | None:
        """``"fanotify"`` or ``"inotify"`` once started."""
        return self.backend.name if self.backend is not None else None

    def start(self) -> None:
        """Place the marks/watches, write START, start the reader thread."""
        t0 = time.time_ns()
        self.backend = self._open_backend()
        if isinstance(self.backend, _Inotify):
            t0 = time.time_ns()  # directories watched during the walk may have missed events
        self._append([Record.marker(START, t0)])
        self._thread = threading.Thread(target=self._loop, name="georep-recorder", daemon=True)
        self._thread.start()

    def _open_backend(self) -> _Fanotify | _Inotify:
        if self.want in ("auto", "fanotify"):
            try:
                return _Fanotify(self.brick, self.exclude, self._c, self.cache_size)
            except OSError as e:
                if self.want == "fanotify" or e.errno not in (errno.EPERM, errno.ENOSYS,
                                                              errno.EINVAL, errno.ENODEV,
                                                              errno.EOPNOTSUPP, errno.EXDEV):
                    raise RecorderError(f"fanotify unavailable: {e}")
                log.info("fanotify unavailable (%s): recording with inotify", e)
        return _Inotify(self.brick, self._c, self.cache_size)

    def stop(self) -> None:
        """Drain the queue, write what is pending and STOP, release the kernel objects."""
        if self._thread is None:
            return
        self._running.set()
        self._stopping.set()
        self._thread.join()
        self._thread = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self.brick.close()
        if self._error is not None:
            raise RecorderError(f"recorder thread failed: {self._error}") from self._error

    def stats(self) -> dict[str, int]:
        """Counters: events read, records written, overflows, dropped (filtered), merged."""
        return dict(self._c)

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the reader thread, if any."""
        return self._error

    def sync(self, timeout: float = 10.0) -> bool:
        """Wait until every event that happened before this call is in the journal."""
        t = time.time_ns()
        with self._cond:
            self._sync_wanted += 1
            try:
                return self._cond.wait_for(
                    lambda: self._drained_at >= t or self._error is not None
                    or self._thread is None, timeout)
            finally:
                self._sync_wanted -= 1

    # test hooks: stop reading (the kernel queue fills up), then read again
    def pause(self) -> None:
        """Stop reading events (testing: lets the kernel queue overflow)."""
        self._running.clear()

    def resume(self) -> None:
        """Read events again after :meth:`pause`."""
        self._running.set()

    # -- reader thread ---------------------------------------------------------------

    def _emit(self, rec: Record) -> None:
        if rec.kind == OVERFLOW:
            self._c["overflows"] += 1
            self._flush()
            self._append([rec])
            return
        key = rec.key()
        if key in self._pending:
            self._c["merged"] += 1
            return
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending[key] = rec

    def _flush(self) -> None:
        if self._pending:
            recs = list(self._pending.values())
            self._pending.clear()
            self._append(recs)

    def _append(self, recs: list[Record]) -> None:
        written = self.writer.append(recs)
        self._c["records"] += len(written)
        if self.on_records is not None:
            try:
                self.on_records(written)
            except Exception:
                log.exception("on_records callback failed")

    def _loop(self) -> None:
        assert self.backend is not None
        be = self.backend
        poller = select.poll()
        poller.register(be.fileno(), select.POLLIN)
        try:
            while True:
                if not self._running.is_set():
                    self._running.wait()
                    continue
                stopping = self._stopping.is_set()
                t = time.time_ns()
                n = be.read(t, self._emit)
                if (len(self._pending) >= self.max_pending
                        or (self._pending
                            and time.monotonic() - self._pending_since >= self.window)):
                    self._flush()
                if n:
                    continue
                # queue empty: every event before t is read
                if stopping or self._sync_wanted:
                    self._flush()
                if not self._pending:
                    with self._cond:
                        self._drained_at = t
                        self._cond.notify_all()
                if stopping:
                    self._append([Record.marker(STOP, t)])
                    self.writer.flush()
                    return
                timeout = 50.0
                if self._pending:
                    left = self.window - (time.monotonic() - self._pending_since)
                    timeout = max(1.0, left * 1000)
                poller.poll(timeout)
        except BaseException as e:
            log.exception("recorder thread failed")
            self._error = e
            with self._cond:
                self._cond.notify_all()
