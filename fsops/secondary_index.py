"""The secondary's private state: the gfid index, limbo and the orphan list.

Layout under ``<root>/.georep`` (see docs/protocol.md):

- ``layout``: ``gfid-bucket-chars N``, how many hex digits name a bucket (2: 256
  buckets; secondaries older than this file have 3: 4,096 buckets).
- ``gfid/ab/<hex>``: a hardlink for a non-directory; for a directory a
  symlink whose target is ``<parent gfid hex>/<name>``. Those symlinks are data, never
  followed.
- ``gfid/ab/ino-<dev>-<ino>`` (unprivileged only): a symlink whose target is the hex
  gfid of the xattr-less object (symlink or special file, which cannot carry ``user.*``
  xattrs) with that inode, so listings can name it. Data, never followed; trusted only
  when the gfid's index entry is that very inode.
- ``limbo/<hex>``: directories evicted or deleted, purged when the crawl ends.
- ``orphans``: concatenated 16-byte gfids whose last visible name went away.

Everything is reached through directory fds and ``*at`` calls so a hostile name or a
tampered index entry cannot make us touch anything outside the secondary root.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading
import uuid
from collections import OrderedDict

from fsops import xattrs
from fsops.constants import GFID_XATTR, LIMBO_GFID, META_DIR, NAME_MAX, ROOT_GFID, is_root
from fsops.gfid import xattrless
from fsops.resolve import open_beneath

GFID_DIR = b"gfid"
LIMBO_DIR = b"limbo"
ORPHANS = b"orphans"

DIR_CACHE_SIZE = 256
INDEX_DIR_CACHE_SIZE = 4096  # every bucket stays open (raised RLIMIT_NOFILE permitting)
#: Longest parent chain followed when resolving a directory; deeper means a loop.
MAX_DEPTH = 4096

_HEX = frozenset(b"0123456789abcdef")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC



class SecondaryError(Exception):
    """The secondary cannot be used at all (missing root, unwritable, broken layout)."""


class NotFound(SecondaryError):
    """A gfid the secondary does not know (or whose index entry is stale)."""


def check_name(name: object) -> bytes:
    """Return ``name`` if it is a valid single path component, else raise OSError(EINVAL)."""
    if (not isinstance(name, bytes) or not 1 <= len(name) <= NAME_MAX or b"/" in name
            or b"\0" in name or name in (b".", b"..")):
        raise OSError(errno.EINVAL, "invalid name")
    return name


def check_gfid(gfid: object) -> bytes:
    """Return ``gfid`` if it is 16 bytes, else raise OSError(EINVAL)."""
    if not isinstance(gfid, bytes) or len(gfid) != 16:
        raise OSError(errno.EINVAL, "invalid gfid")
    return gfid


def lstat_or_none(dir_fd: int, name: bytes) -> os.stat_result | None:
    """lstat of ``name`` in ``dir_fd``, None when absent; for names usually present."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def lstat_if_present(dir_fd: int, name: bytes) -> os.stat_result | None:
    """lstat of ``name`` in ``dir_fd``, None when absent; for names usually absent.

    ``faccessat`` answers "absent" without Python building a FileNotFoundError, which costs
    about 3.5 us on top of the syscall (a create's target and its index entry: once per
    entry of a first sync).
    """
    if not os.access(name, os.F_OK, dir_fd=dir_fd, follow_symlinks=False):
        return None
    return lstat_or_none(dir_fd, name)


def hexname(gfid: bytes) -> bytes:
    """Index file name of a gfid."""
    return gfid.hex().encode()


def parse_dir_target(target: bytes) -> tuple[bytes, bytes] | None:
    """``(parent gfid, name)`` from a directory index symlink target, None if malformed."""
    phex, sep, name = target.partition(b"/")
    if not sep or len(phex) != 32 or not _HEX.issuperset(phex):
        return None
    try:
        check_name(name)
    except OSError:
        return None
    parent = bytes.fromhex(phex.decode())
    if parent == ROOT_GFID and name == META_DIR:
        return None
    return parent, name


def open_dir_beneath(base_fd: int, path: bytes) -> int:
    """Open directory ``path`` under ``base_fd`` without following any symlink or ``..``.

    The kernel enforces it (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS, or an O_NOFOLLOW
    walk on old kernels): see :mod:`fsops.resolve`.
    """
    for comp in path.split(b"/"):
        check_name(comp)
    return open_beneath(base_fd, path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


class FdCache:
    """Bounded LRU of open directory fds, safe to share between threads.

    Callers use a returned fd right away and never close it; the capacity is far above
    the handful of fds one operation holds at once.  An fd that leaves the cache is
    closed at once, except while :meth:`hold` is in effect (several applier threads use
    the cache): then it is closed by :meth:`release`, when no thread can still be using
    it.  A closed fd number would be reused by the next open, so closing one another
    thread is about to use could make it act on the wrong directory.  During a hold,
    each entry is checked once (the fstat of ``check``): the ops of one batch drop what
    they remove themselves, and a directory removed by someone else refuses creates.
    """

    def __init__(self, capacity: int, *, check: bool = True) -> None:
        self.capacity = capacity
        #: Whether ``get`` checks that the directory still exists (an fstat).  The index
        #: buckets are never removed, so their cache skips it.
        self.check = check
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()
        self._held = 0
        self._dead: list[int] = []
        #: Keys checked during the current hold.
        self._checked: set[bytes] = set()

    def _close(self, fd: int) -> None:
        # (called with the lock held)
        if self._held:
            self._dead.append(fd)
        else:
            os.close(fd)

    def get(self, key: bytes) -> int | None:
        """The cached fd, or None; a directory removed behind our back is dropped."""
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                return None
            if self.check and key not in self._checked:
                try:
                    gone = os.fstat(fd).st_nlink == 0
                except OSError:
                    gone = True
                if gone:
                    del self._fds[key]
                    self._close(fd)
                    return None
                if self._held:
                    self._checked.add(key)
            self._fds.move_to_end(key)
            return fd

    def put(self, key: bytes, fd: int) -> None:
        """Take ownership of ``fd``."""
        with self._lock:
            old = self._fds.pop(key, None)
            if old is not None and old != fd:
                self._close(old)
            self._checked.discard(key)
            self._fds[key] = fd
            while len(self._fds) > self.capacity:
                _, victim = self._fds.popitem(last=False)
                self._close(victim)

    def drop(self, key: bytes) -> None:
        """Forget and close one entry."""
        with self._lock:
            fd = self._fds.pop(key, None)
            if fd is not None:
                self._close(fd)

    def hold(self) -> None:
        """Defer closing until the matching :meth:`release` (threads share the fds now)."""
        with self._lock:
            self._held += 1

    def release(self) -> None:
        """End a :meth:`hold`; the last one closes the fds that left the cache meanwhile."""
        with self._lock:
            self._held -= 1
            if self._held:
                return
            self._checked.clear()
            dead, self._dead = self._dead, []
        for fd in dead:
            os.close(fd)

    def close_all(self) -> None:
        """Close every cached fd."""
        with self._lock:
            fds = list(self._fds.values()) + self._dead
            self._fds.clear()
            self._dead = []
        for fd in fds:
            os.close(fd)


#: Hex digits of a gfid that name its index bucket in a new secondary (16**2 = 256
#: buckets).  Secondaries made before the ``layout`` file existed use 3 (4,096 buckets)
#: and keep them: the width is read from ``.georep/layout`` (see :func:`_bucket_chars`).
BUCKET_CHARS = 2
LEGACY_BUCKET_CHARS = 3
LAYOUT = b"layout"
_LAYOUT_FMT = b"gfid-bucket-chars %d\n"


def _bucket_chars(meta_fd: int, gfid_fd: int) -> int:
    """The index's bucket width: from ``layout``, else chosen now and recorded there.

    No ``layout`` file: an empty index is new and gets :data:`BUCKET_CHARS`; one that
    holds anything was made with 4,096 buckets (:data:`LEGACY_BUCKET_CHARS`).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never a fifo's open
    try:
        fd = os.open(LAYOUT, flags, dir_fd=meta_fd)
    except FileNotFoundError:
        with os.scandir(gfid_fd) as it:
            chars = LEGACY_BUCKET_CHARS if next(it, None) is not None else BUCKET_CHARS
        tmp = LAYOUT + b".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=meta_fd)
        try:
            os.write(fd, _LAYOUT_FMT % chars)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, LAYOUT, src_dir_fd=meta_fd, dst_dir_fd=meta_fd)
        return chars
    try:
        raw = os.read(fd, 64)
    finally:
        os.close(fd)
    for chars in (BUCKET_CHARS, LEGACY_BUCKET_CHARS):
        if raw == _LAYOUT_FMT % chars:
            return chars
    raise OSError(errno.EINVAL, f"unknown index layout {raw[:40]!r} in {LAYOUT.decode()}")


def _open_or_make_dir(name: bytes, dir_fd: int, create: bool) -> int:
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


class GfidIndex:
    """gfid -> object lookups for the secondary, plus limbo and orphan bookkeeping."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._fds: list[int] = []
        try:
            self.meta_fd = self._keep(_open_or_make_dir(META_DIR, root_fd, True))
            self.gfid_fd = self._keep(_open_or_make_dir(GFID_DIR, self.meta_fd, True))
            self.limbo_fd = self._keep(_open_or_make_dir(LIMBO_DIR, self.meta_fd, True))
            self.orphans_fd = self._keep(os.open(
                ORPHANS, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600, dir_fd=self.meta_fd))
            ost = os.fstat(self.orphans_fd)
            if not stat.S_ISREG(ost.st_mode) or ost.st_nlink != 1:
                # A hardlink would let us append to and truncate a file elsewhere.
                raise OSError(errno.EPERM, f"{ORPHANS.decode()} is not a private regular file")
            self.bucket_chars = _bucket_chars(self.meta_fd, self.gfid_fd)
        except OSError as e:
            self.close()
            raise SecondaryError(f"cannot set up {META_DIR.decode()}/: {e.strerror}") from None
        self.dirs = FdCache(DIR_CACHE_SIZE)
        # Two SecondaryFS (applier, lister) share the process's fd limit: a quarter each.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        budget = INDEX_DIR_CACHE_SIZE if soft == resource.RLIM_INFINITY else soft // 4
        self.bucket_cache = FdCache(max(64, min(INDEX_DIR_CACHE_SIZE, budget)), check=False)

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        """Close every fd this index holds."""
        for cache in ("dirs", "bucket_cache"):
            c = getattr(self, cache, None)
            if c is not None:
                c.close_all()
        while self._fds:
            os.close(self._fds.pop())

    # -- index entries -------------------------------------------------------------

    def idx_dir(self, gfid: bytes, *, create: bool = False) -> int | None:
        """fd of the bucket ``gfid/ab`` holding the gfid's entry (made lazily when ``create``).

        One level of 256 buckets (4,096 in older secondaries): a first sync creates at
        most 256 directories in all (two levels of 256 made a new leaf directory for
        almost every object, the most expensive syscall of the whole apply; 4,096 buckets
        still cost a `mkdir` per 5 files of a 20,000-entry first sync), and ext4 and xfs
        index large directories (at 1,000,000 objects a bucket holds ~3,900 entries).
        """
        key = hexname(gfid)[:self.bucket_chars]
        fd = self.bucket_cache.get(key)
        if fd is not None:
            return fd
        try:
            fd = os.open(key, _DIR_FLAGS, dir_fd=self.gfid_fd)
        except FileNotFoundError:
            if not create:
                return None
            fd = _open_or_make_dir(key, self.gfid_fd, True)
        self.bucket_cache.put(key, fd)
        return fd

    def has(self, gfid: bytes) -> bool:
        """Whether the gfid has an index entry (one ``faccessat``; a stale one counts)."""
        d = self.idx_dir(gfid)
        return d is not None and os.access(hexname(gfid), os.F_OK, dir_fd=d,
                                           follow_symlinks=False)

    def lstat(self, gfid: bytes, *, likely: bool = False) -> os.stat_result | None:
        """lstat of the gfid's index entry, None when absent.  ``likely``: the entry is
        usually there (a listing's objects), so one ``lstat`` is cheaper than the
        ``faccessat`` that saves building an exception when it is usually absent."""
        d = self.idx_dir(gfid)
        if d is None:
            return None
        return (lstat_or_none if likely else lstat_if_present)(d, hexname(gfid))

    def is_object(self, gfid: bytes, st: os.stat_result) -> bool:
        """Whether index entry ``st`` is a hardlink of the object itself.

        Directory entries are symlinks, and so are links of symlink objects; ours carry
        the gfid xattr as root (a directory's index symlink never does). As non-root
        symlinks cannot carry it: a second name, or a target that is no directory
        record, marks an object.
        """
        d = self.idx_dir(gfid)
        if d is None:
            return False
        if not stat.S_ISLNK(st.st_mode):
            # A hardlink planted in the index (say to a file outside the root) lacks our
            # xattr: never take it for the object. As non-root special files cannot carry
            # user.* xattrs, so for them the index link alone names the object.
            try:
                g = xattrs.get(hexname(gfid), GFID_XATTR, dir_fd=d)
            except OSError:
                return False
            if g is not None:
                return g == gfid
            return not is_root() and not stat.S_ISREG(st.st_mode)
        if is_root():
            try:
                return xattrs.get(hexname(gfid), GFID_XATTR, dir_fd=d) == gfid
            except OSError:
                return False
        return st.st_nlink > 1 or self.dir_target(gfid) is None

    def dir_target(self, gfid: bytes) -> tuple[bytes, bytes] | None:
        """``(parent gfid, name)`` recorded for a directory gfid, None if none/malformed."""
        d = self.idx_dir(gfid)
        if d is None:
            return None
        try:
            target = os.readlink(hexname(gfid), dir_fd=d)
        except OSError:
            return None
        return parse_dir_target(target)

    def set_dir(self, gfid: bytes, pgfid: bytes, name: bytes) -> None:
        """Record directory ``gfid`` as ``name`` in ``pgfid`` (atomic replace)."""
        target = hexname(pgfid) + b"/" + name
        d = self.idx_dir(gfid, create=True)
        assert d is not None
        h = hexname(gfid)
        try:
            if os.readlink(h, dir_fd=d) == target:
                return
        except OSError:
            pass
        tmp = h + b".tmp"
        try:
            os.unlink(tmp, dir_fd=d)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp, dir_fd=d)
        os.rename(tmp, h, src_dir_fd=d, dst_dir_fd=d)

    def set_link(self, gfid: bytes, dir_fd: int, name: bytes, ino: int | None, *,
                 fd: int | None = None) -> None:
        """Make the gfid's index entry a hardlink of ``name`` (inode ``ino``) in ``dir_fd``.

        ``ino`` may be None when ``fd`` is the object's open fd: the inode number is then
        read from it only if needed (saves an fstat per created file).  Unprivileged, an
        object that cannot carry the gfid xattr also gets its inode record, so that
        listings can name it.
        """
        if ino is None and not is_root():
            assert fd is not None
            ino = os.fstat(fd).st_ino
        self._set_link(gfid, dir_fd, name, ino, fd)
        if not is_root():
            st = self.lstat(gfid)
            if st is not None and st.st_ino == ino and xattrless(st.st_mode):
                self.set_ino(gfid, st)

    def _set_link(self, gfid: bytes, dir_fd: int, name: bytes, ino: int | None,
                  fd: int | None = None) -> None:
        d = self.idx_dir(gfid, create=True)
        assert d is not None
        h = hexname(gfid)
        try:
            os.link(name, h, src_dir_fd=dir_fd, dst_dir_fd=d, follow_symlinks=False)
            return
        except FileExistsError:
            pass
        if ino is None:
            assert fd is not None
            ino = os.fstat(fd).st_ino
        st = os.stat(h, dir_fd=d, follow_symlinks=False)
        if st.st_ino == ino:
            return
        tmp = h + b".tmp"
        try:
            os.unlink(tmp, dir_fd=d)
        except FileNotFoundError:
            pass
        os.link(name, tmp, src_dir_fd=dir_fd, dst_dir_fd=d, follow_symlinks=False)
        os.rename(tmp, h, src_dir_fd=d, dst_dir_fd=d)

    def remove(self, gfid: bytes) -> None:
        """Drop the gfid's index entry; absent is fine."""
        d = self.idx_dir(gfid)
        if d is None:
            return
        if not is_root():
            st = self.lstat(gfid)
            if st is not None and xattrless(st.st_mode) and self.ino_gfid(st) == gfid:
                self._drop_ino(st)
        try:
            os.unlink(hexname(gfid), dir_fd=d)
        except FileNotFoundError:
            pass

    # -- inode records of xattr-less objects (unprivileged only) --------------------

    def _ino_loc(self, st: os.stat_result, create: bool) -> tuple[int | None, bytes]:
        key = b"%0*x" % (self.bucket_chars, st.st_ino & ((1 << 4 * self.bucket_chars) - 1))
        name = b"ino-%x-%x" % (st.st_dev, st.st_ino)
        fd = self.bucket_cache.get(key)
        if fd is None:
            try:
                fd = os.open(key, _DIR_FLAGS, dir_fd=self.gfid_fd)
            except FileNotFoundError:
                if not create:
                    return None, name
                fd = _open_or_make_dir(key, self.gfid_fd, True)
            self.bucket_cache.put(key, fd)
        return fd, name

    def set_ino(self, gfid: bytes, st: os.stat_result) -> None:
        """Record that the xattr-less object of inode ``st`` is ``gfid``."""
        if self.ino_gfid(st) == gfid:
            return
        d, name = self._ino_loc(st, True)
        assert d is not None
        tmp = name + b".tmp"
        try:
            os.unlink(tmp, dir_fd=d)
        except FileNotFoundError:
            pass
        os.symlink(hexname(gfid), tmp, dir_fd=d)
        os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)

    def ino_gfid(self, st: os.stat_result) -> bytes | None:
        """gfid recorded for the xattr-less object ``st``, if its index entry is that inode."""
        d, name = self._ino_loc(st, False)
        if d is None:
            return None
        try:
            target = os.readlink(name, dir_fd=d)
        except OSError:
            return None
        if len(target) != 32 or not _HEX.issuperset(target):
            return None
        gfid = bytes.fromhex(target.decode())
        ist = self.lstat(gfid)
        if ist is None or (ist.st_ino, ist.st_dev) != (st.st_ino, st.st_dev):
            return None
        return gfid

    def _drop_ino(self, st: os.stat_result) -> None:
        d, name = self._ino_loc(st, False)
        if d is not None:
            try:
                os.unlink(name, dir_fd=d)
            except FileNotFoundError:
                pass

    # -- directories ---------------------------------------------------------------

    def dir_fd(self, gfid: bytes) -> int | None:
        """Open (cached) fd of directory ``gfid``, or None when unknown or stale.

        The parent chain is read from index symlinks up to the root, limbo or a cached
        ancestor, opened beneath that base with no symlink following, and the result is
        accepted only if it carries the wanted gfid.
        """
        if gfid == ROOT_GFID:
            return self.root_fd
        if gfid == LIMBO_GFID:
            return self.limbo_fd
        fd = self.dirs.get(gfid)
        if fd is not None:
            return fd
        chain: list[bytes] = []
        seen = {gfid}
        cur = gfid
        while True:
            t = self.dir_target(cur)
            if t is None:
                return None
            parent, name = t
            chain.append(name)
            if parent in seen or len(chain) > MAX_DEPTH:
                return None
            seen.add(parent)
            if parent == ROOT_GFID:
                base = self.root_fd
                break
            if parent == LIMBO_GFID:
                base = self.limbo_fd
                break
            cached = self.dirs.get(parent)
            if cached is not None:
                base = cached
                break
            cur = parent
        try:
            fd = open_dir_beneath(base, b"/".join(reversed(chain)))
        except OSError:
            return None
        try:
            ok = xattrs.get(fd, GFID_XATTR) == gfid
        except OSError:
            ok = False
        if not ok:
            os.close(fd)
            return None
        self.dirs.put(gfid, fd)
        return fd

    def forget_dir(self, gfid: bytes) -> None:
        """Drop a directory from the fd cache (it was removed)."""
        self.dirs.drop(gfid)

    # -- orphans -------------------------------------------------------------------

    def add_orphan(self, gfid: bytes) -> None:
        """Record that ``gfid`` lost a name; end_crawl checks whether it lost its last."""
        os.write(self.orphans_fd, gfid)

    def orphans(self) -> list[bytes]:
        """Recorded orphan gfids (a torn trailing record from a crash is ignored)."""
        size = os.fstat(self.orphans_fd).st_size
        raw = os.pread(self.orphans_fd, size, 0)
        return [raw[i:i + 16] for i in range(0, len(raw) - 15, 16)]

    def clear_orphans(self) -> None:
        """Empty the orphan list."""
        os.ftruncate(self.orphans_fd, 0)


def new_gfid() -> bytes:
    """A fresh random gfid (for a secondary-only directory that must live in limbo)."""
    return uuid.uuid4().bytes
