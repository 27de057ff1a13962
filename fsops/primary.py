"""Read-only access to a primary brick: directory listings with gfids and metadata.

The crawler only reads; the one thing it writes on the primary is a gfid xattr on an
object seen for the first time (and the marks on the root, see :mod:`fsops.marks`).
Directories are opened beneath the brick root with no symlink crossing, and each
opened directory's gfid is checked against what its parent's listing said, so a
directory swapped for something else mid-crawl is skipped, not misread.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from fsops import fanotify, xattrs
from fsops import gfid as gfids
from fsops.constants import (
    META_DIR,
    ROOT_GFID,
    T_BLK,
    T_CHR,
    T_DIR,
    T_FIFO,
    T_FILE,
    T_SOCK,
    T_SYMLINK,
)
from fsops.resolve import open_beneath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME
_TYPES = {
    stat.S_IFREG: T_FILE, stat.S_IFDIR: T_DIR, stat.S_IFLNK: T_SYMLINK,
    stat.S_IFIFO: T_FIFO, stat.S_IFCHR: T_CHR, stat.S_IFBLK: T_BLK, stat.S_IFSOCK: T_SOCK,
}


class PrimaryError(Exception):
    """The primary brick cannot be read as a whole (missing root, not a directory)."""


def _names(dir_fd: int) -> list[str]:
    with os.scandir(dir_fd) as it:
        return [de.name for de in it]


@dataclass(slots=True)
class Entry:
    """One object in a primary directory, as the reconciler needs it."""

    name: bytes
    gfid: bytes
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    ino: int
    rdev: int = 0
    target: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    xdigest: bytes = b""
    #: Its gfid was minted when this entry was read: no secondary can know it yet.
    minted: bool = field(default=False, compare=False)

    def meta(self) -> dict[str, object]:
        """The meta map of docs/protocol.md for this object."""
        return {"mode": self.mode, "uid": self.uid, "gid": self.gid,
                "atime": self.atime_ns, "mtime": self.mtime_ns, "xattrs": self.xattrs}


def entry_type(mode: int) -> str:
    """Wire type code of a ``st_mode``."""
    return _TYPES[stat.S_IFMT(mode)]


class PrimaryTree:
    """A primary brick root, opened once; everything below is reached beneath it."""

    def __init__(self, root: bytes, *, xattr_scope: str = xattrs.ALL) -> None:
        self.root = os.path.abspath(root)
        #: Which xattrs entries carry (fsops.xattrs scopes: config sync-xattrs, sync-acls).
        self.xattr_scope = xattr_scope
        try:
            self.root_fd = os.open(self.root, _DIR_FLAGS | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PrimaryError(f"primary {os.fsdecode(self.root)!r} does not exist")
        except NotADirectoryError:
            raise PrimaryError(f"primary {os.fsdecode(self.root)!r} is not a directory")
        except PermissionError:
            self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self.root_fd)
        self.root_dev = st.st_dev

    def close(self) -> None:
        """Release the root fd."""
        os.close(self.root_fd)

    def open_dir(self, relpath: bytes, want_gfid: bytes) -> int | None:
        """fd of the directory at ``relpath`` if it is still the object ``want_gfid``."""
        if not relpath:
            return os.dup(self.root_fd)
        try:
            fd = open_beneath(self.root_fd, relpath, _DIR_FLAGS)
        except PermissionError:
            fd = open_beneath(self.root_fd, relpath, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                return None
            raise
        ino = os.fstat(fd).st_ino
        if gfids.read_gfid(fd, ino) != want_gfid:
            os.close(fd)
            return None
        return fd

    def open_file(self, relpath: bytes, want_gfid: bytes) -> int | None:
        """Read-only fd (O_NOATIME if allowed) of the file at ``relpath`` if it is ``want_gfid``."""
        flags = os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW
        try:
            try:
                fd = open_beneath(self.root_fd, relpath, flags)
            except PermissionError:
                fd = open_beneath(self.root_fd, relpath, flags & ~os.O_NOATIME)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                return None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or gfids.read_gfid(fd, st.st_ino) != want_gfid:
            os.close(fd)
            return None
        return fd

    def open_handle(self, handle: bytes, want_gfid: bytes) -> int | None:
        """Read-only fd of the regular file with this kernel file handle if it is
        ``want_gfid`` and still linked somewhere (open_by_handle_at: needs root).

        Opened O_PATH first: only a regular file is then opened for reading (a fifo would
        block the open, a device could act on it), through its /proc/self/fd link.
        """
        try:
            pfd = fanotify.open_by_handle_at(self.root_fd, handle, os.O_PATH)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESTALE, errno.ELOOP, errno.ENXIO):
                return None
            raise
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink == 0:
                return None
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # (the magic link is followed)
            link = b"/proc/self/fd/%d" % pfd
            try:
                fd = os.open(link, flags | os.O_NOATIME)
            except PermissionError:
                fd = os.open(link, flags)
        except FileNotFoundError:
            return None
        finally:
            os.close(pfd)
        st2 = os.fstat(fd)
        if ((st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino)
                or gfids.read_gfid(fd, st2.st_ino) != want_gfid):
            os.close(fd)
            return None
        return fd

    def entry_of_fd(self, fd: int, gfid: bytes) -> Entry:
        """An open regular file as an Entry without a name (``name`` is empty)."""
        st = os.fstat(fd)
        attrs = xattrs.read_replicated(fd, scope=self.xattr_scope)
        return Entry(b"", gfid, T_FILE, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                     st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink,
                     st.st_ino, 0, None, attrs, xattrs.digest(attrs))

    def root_entry(self) -> Entry:
        """The brick root as an Entry (its gfid is always ROOT_GFID)."""
        st = os.fstat(self.root_fd)
        attrs = xattrs.read_replicated(self.root_fd, scope=self.xattr_scope)
        return Entry(b"", ROOT_GFID, T_DIR, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                     0, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink,
                     st.st_ino, 0, None, attrs, xattrs.digest(attrs))

    def list_dir(self, dir_fd: int, *,
                 is_root: bool) -> tuple[list[Entry], list[tuple[bytes, str]]]:
        """Every entry of an open directory with its gfid (assigned on first sight).

        Returns (entries sorted by name, problems) where problems are (name, reason)
        pairs for entries that vanished or could not be read; they are not fatal.
        """
        return self._entries(dir_fd, _names(dir_fd), is_root)

    def _entries(self, dir_fd: int, names: list[str],
                 is_root: bool) -> tuple[list[Entry], list[tuple[bytes, str]]]:
        entries: list[Entry] = []
        problems: list[tuple[bytes, str]] = []
        for n in names:
            name = os.fsencode(n)
            if is_root and name == META_DIR:
                continue
            try:
                entries.append(self._entry(dir_fd, name))
            except FileNotFoundError:
                continue  # removed while we listed: the next pass or the journal sees it
            except OSError as e:
                problems.append((name, f"{os.strerror(e.errno or 0)} (errno {e.errno})"))
        entries.sort(key=lambda e: e.name)
        return entries, problems

    def iter_dir(self, dir_fd: int, *, is_root: bool, size: int
                 ) -> Iterator[tuple[list[Entry], list[tuple[bytes, str]]]]:
        """:meth:`list_dir` in parts of up to ``size`` names (each part sorted by name),
        for a directory whose entries can be planned part by part (one new on the
        secondary): the first part goes out before the last name is read."""
        names = _names(dir_fd)
        for start in range(0, len(names), size):
            yield self._entries(dir_fd, names[start:start + size], is_root)

    def stat_entry(self, dir_fd: int, name: bytes) -> Entry:
        """One entry of an open directory, as :meth:`list_dir` would report it."""
        return self._entry(dir_fd, name)

    def _entry(self, dir_fd: int, name: bytes) -> Entry:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        t = entry_type(st.st_mode)
        gfid, minted = gfids.gfid_of(name, st.st_ino, dir_fd=dir_fd, st=st)
        attrs = xattrs.read_replicated(name, dir_fd=dir_fd, scope=self.xattr_scope)
        target = os.readlink(name, dir_fd=dir_fd) if t == T_SYMLINK else None
        return Entry(name, gfid, t, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                     st.st_size if t == T_FILE else 0, st.st_atime_ns, st.st_mtime_ns,
                     st.st_ctime_ns, st.st_nlink, st.st_ino,
                     st.st_rdev if t in (T_CHR, T_BLK) else 0, target, attrs,
                     xattrs.digest(attrs), minted)
