"""The secondary side: the only writer of the replica tree.

Objects are addressed by gfid. Each carries its gfid in ``GFID_XATTR`` and has an entry in
the index under ``.georep/gfid`` (see fsops.secondary_index), so renames and hardlinks seen
on the primary become renames and hardlinks here instead of copies. Every entry op checks
the gfid of what it is about to touch, so replaying an op is a no-op and a name that was
reused for another object is never clobbered blindly.

Nothing is reached by absolute path: all calls are relative to directory fds and never
follow symlinks, so neither names from the wire nor symlinks planted in the replica can
lead outside the root.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from collections.abc import Mapping
from typing import Any

from fsops import blocks, xattrs
from fsops.constants import (
    ENTRY_TYPES,
    GFID_XATTR,
    LIMBO_GFID,
    META_DIR,
    NO_GFID,
    RESERVED_GFIDS,
    ROOT_GFID,
    T_BLK,
    T_CHR,
    T_DIR,
    T_FIFO,
    T_FILE,
    T_SOCK,
    T_SYMLINK,
    is_root,
)
from fsops.gfid import xattrless
from fsops.secondary_index import (
    GfidIndex,
    NotFound,
    SecondaryError,
    check_gfid,
    check_name,
    hexname,
    lstat_if_present,
    lstat_or_none,
    new_gfid,
)

__all__ = ["NotFound", "SecondaryError", "SecondaryFS"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_PREFIX = b".georep-tmp-"

_MKNOD_FMT = {T_FIFO: stat.S_IFIFO, T_CHR: stat.S_IFCHR, T_BLK: stat.S_IFBLK,
              T_SOCK: stat.S_IFSOCK}

Meta = Mapping[str, Any]
Times = tuple[int, int]


_TYPES = {stat.S_IFREG: T_FILE, stat.S_IFDIR: T_DIR, stat.S_IFLNK: T_SYMLINK,
          stat.S_IFIFO: T_FIFO, stat.S_IFCHR: T_CHR, stat.S_IFBLK: T_BLK, stat.S_IFSOCK: T_SOCK}


def type_of(mode: int) -> str:
    """Wire type code of an st_mode."""
    return _TYPES.get(stat.S_IFMT(mode), "?")


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} ({what})")


_NEW_FILE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _row(st: os.stat_result, xattr_digest: bytes, nlink: int) -> list:
    """[type, mode, uid, gid, size, mtime_ns, xattr_digest, nlink]: a listing's entry."""
    return [type_of(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            st.st_size, st.st_mtime_ns, xattr_digest, nlink]


def _times(fd: int) -> Times:
    st = os.fstat(fd)
    return st.st_atime_ns, st.st_mtime_ns


def _raw_gfid(raw: bytes | None) -> bytes | None:
    return raw if raw is not None and len(raw) == 16 else None


def _pread_all(fd: int, n: int) -> bytes:
    parts = []
    off = 0
    while off < n:
        b = os.pread(fd, n - off, off)
        if not b:
            break
        parts.append(b)
        off += len(b)
    return b"".join(parts)


def _pwrite_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    off = 0
    while off < len(mv):
        off += os.pwrite(fd, mv[off:], off)


def _write_all(fd: int, data: bytes) -> None:
    _pwrite_all(fd, data)
    os.ftruncate(fd, len(data))


def _wanted_xattrs(meta: Meta, t: str) -> Mapping[bytes, bytes] | None:
    wanted = meta.get("xattrs")
    if wanted is None:
        return None
    if t not in (T_FILE, T_DIR):
        # The kernel refuses user.* on symlinks and special files: such a set cannot exist.
        wanted = {k: v for k, v in wanted.items() if not k.startswith(b"user.")}
    return wanted


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class SecondaryFS:
    """The replica tree and its gfid index; applies entry, meta and data operations."""

    #: Which xattrs meta ops manage and listings digest (fsops.xattrs scopes); the
    #: secondary host sets it from the primary's hello (config sync-xattrs, sync-acls).
    xattr_scope: str = xattrs.ALL

    def __init__(self, root: bytes, *, create: bool = False) -> None:
        if isinstance(root, str):
            root = os.fsencode(root)
        _raise_nofile()
        shown = os.fsdecode(root)
        if create:
            try:
                os.makedirs(root, 0o755, exist_ok=True)
            except OSError as e:
                raise SecondaryError(f"cannot create secondary root {shown}: {e.strerror}")
        try:
            # The root path itself comes from the administrator, not the wire: follow it.
            self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SecondaryError(f"secondary root {shown} does not exist")
        except NotADirectoryError:
            raise SecondaryError(f"secondary root {shown} is not a directory")
        except OSError as e:
            raise SecondaryError(f"cannot open secondary root {shown}: {e.strerror}")
        try:
            if not os.access(root, os.W_OK | os.X_OK):
                raise SecondaryError(f"secondary root {shown} is not writable")
            try:
                if _raw_gfid(xattrs.get(self.root_fd, GFID_XATTR)) != ROOT_GFID:
                    xattrs.set(self.root_fd, GFID_XATTR, ROOT_GFID)
            except OSError as e:
                raise SecondaryError(
                    f"cannot set the root gfid xattr on {shown}: {e.strerror}")
            self.index = GfidIndex(self.root_fd)
        except BaseException:
            os.close(self.root_fd)
            raise
        self._closed = False

    def close(self) -> None:
        """Release every fd (cached directories, index, root)."""
        if self._closed:
            return
        self._closed = True
        self.index.close()
        os.close(self.root_fd)

    def __enter__(self) -> SecondaryFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- batch entry point ---------------------------------------------------------

    def apply_ops(self, ops: list[dict]) -> list[dict]:
        """Apply entry/meta ops in order; one result per op, failures as values."""
        results: list[dict] = []
        for op in ops:
            kind = op.get("op") if isinstance(op, dict) else None
            try:
                if not isinstance(op, dict):
                    raise _err(errno.EINVAL, "op is not a map")
                results.append({"s": self._dispatch(kind, op)})
            except OSError as e:
                code = e.errno or errno.EIO
                why = e.strerror or os.strerror(code)
                results.append({"s": "error", "errno": code,
                                "message": f"{kind} {_label(op)!r}: {why}"})
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
                # (OverflowError: an out-of-range int an unvalidated caller passed, e.g. a
                # uid, mode or rdev beyond what the syscall takes.)
                results.append({"s": "error", "errno": errno.EINVAL,
                                "message": f"{kind} {_label(op)!r}: malformed op ({e})"})
        return results

    def _dispatch(self, kind: object, op: dict) -> str:
        if kind == "ensure":
            return self.ensure(op["pgfid"], op["name"], op["gfid"], op["type"],
                               meta=op.get("meta"), target=op.get("target"),
                               rdev=op.get("rdev") or 0, data=op.get("data"))
        if kind == "delete":
            return self.delete(op["pgfid"], op["name"], op["gfid"])
        if kind == "rename":
            return self.rename(op["gfid"], op["pgfid"], op["name"], op["npgfid"],
                               op["nname"], op["type"])
        if kind == "meta":
            return self.meta(op["gfid"], op["meta"])
        raise _err(errno.EINVAL, f"unknown op {kind!r}")

    # -- helpers -------------------------------------------------------------------

    def _parent(self, pgfid: bytes, name: bytes) -> int | None:
        """fd of directory ``pgfid`` after validating ``name`` for it; None if unknown."""
        check_gfid(pgfid)
        check_name(name)
        if pgfid == ROOT_GFID and name == META_DIR:
            raise _err(errno.EPERM, "reserved name")
        if pgfid == LIMBO_GFID:
            raise _err(errno.EPERM, "limbo is private")
        return self.index.dir_fd(pgfid)

    def _need_parent(self, pgfid: bytes, name: bytes) -> int:
        fd = self._parent(pgfid, name)
        if fd is None:
            raise _err(errno.ENOENT, "parent gfid unknown")
        return fd

    def _gfid_at(self, dir_fd: int, name: bytes, st: os.stat_result,
                 hint: bytes | None = None) -> bytes | None:
        """gfid of the object at ``name``; ``hint`` identifies xattr-less special files."""
        g = _raw_gfid(xattrs.get(name, GFID_XATTR, dir_fd=dir_fd))
        if g is None and xattrless(st.st_mode):
            g = self.index.ino_gfid(st)
        if g is None and hint is not None and not stat.S_ISDIR(st.st_mode):
            # As non-root, symlinks cannot carry the xattr: the index link identifies them.
            ist = self.index.lstat(hint)
            if ist is not None and (ist.st_ino, ist.st_dev) == (st.st_ino, st.st_dev):
                return hint
        return g

    def _set_gfid(self, dir_fd: int, name: bytes, gfid: bytes, t: str) -> None:
        try:
            xattrs.set(name, GFID_XATTR, gfid, dir_fd=dir_fd)
        except PermissionError:
            if t in (T_FILE, T_DIR) or is_root():
                raise
            # user.* is refused on symlinks and special files: the index link alone names it.

    def _restore(self, fd: int, times: Times) -> None:
        os.utime(fd, ns=times)

    def _to_limbo(self, pfd: int, pgfid: bytes, name: bytes, gfid: bytes | None) -> None:
        """Move directory ``name`` into limbo, where a later ensure can rescue it."""
        if gfid is None:
            gfid = new_gfid()
            dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                xattrs.set(dfd, GFID_XATTR, gfid)
            finally:
                os.close(dfd)
        lname = hexname(gfid)
        if lstat_or_none(self.index.limbo_fd, lname) is not None:
            lname += b"." + new_gfid().hex()[:8].encode()
        t = self.index.dir_target(gfid)
        os.rename(name, lname, src_dir_fd=pfd, dst_dir_fd=self.index.limbo_fd)
        if t is None or t == (pgfid, name):
            self.index.set_dir(gfid, LIMBO_GFID, lname)

    def _evict(self, pfd: int, pgfid: bytes, name: bytes, st: os.stat_result,
               gfid: bytes | None) -> None:
        if stat.S_ISDIR(st.st_mode):
            self._to_limbo(pfd, pgfid, name, gfid)
            return
        if gfid is not None:
            # Recorded first: a crash before the unlink leaves a harmless extra check.
            self.index.add_orphan(gfid)
        os.unlink(name, dir_fd=pfd)

    def _index_obj(self, gfid: bytes, t: str) -> os.stat_result | None:
        """Index entry of non-directory ``gfid`` if it is of type ``t``."""
        st = self.index.lstat(gfid)
        if st is None or type_of(st.st_mode) != t or not self.index.is_object(gfid, st):
            return None
        return st

    def _reusable(self, gfid: bytes, t: str, target: bytes | None, rdev: int) -> bool:
        """Whether non-directory ``gfid`` exists in the index as a ``t`` that can be linked.

        Same gfid but another symlink target or device number: a new object took the
        identity (an unprivileged primary derives the gfid of symlinks and special files
        from the inode number, which the filesystem may reuse).  The old object is not
        that one: its index entry is dropped and the caller creates a new object.
        """
        st = self._index_obj(gfid, t)
        if st is None:
            return False
        idx = self.index.idx_dir(gfid)
        assert idx is not None
        if self._same_kind(idx, hexname(gfid), st, t, target, rdev):
            return True
        self.index.remove(gfid)
        return False

    def _find_dir(self, gfid: bytes) -> tuple[int, int, bytes] | None:
        """``(dir fd, parent fd, name)`` of live directory ``gfid``, None if unknown."""
        fd = self.index.dir_fd(gfid)
        loc = self.index.dir_target(gfid)
        if fd is None or loc is None:
            return None
        pfd = self.index.dir_fd(loc[0])
        if pfd is None:
            return None
        st = lstat_or_none(pfd, loc[1])
        fst = os.fstat(fd)
        if st is None or (st.st_ino, st.st_dev) != (fst.st_ino, fst.st_dev):
            return None
        return fd, pfd, loc[1]

    def _same_kind(self, pfd: int, name: bytes, st: os.stat_result, t: str,
                   target: bytes | None, rdev: int) -> bool:
        if type_of(st.st_mode) != t:
            return False
        if t == T_SYMLINK and target is not None:
            return os.readlink(name, dir_fd=pfd) == target
        if t in (T_CHR, T_BLK) and rdev:
            return st.st_rdev == rdev
        return True

    def _write_data(self, pfd: int, name: bytes, data: bytes) -> None:
        """Make the file's content ``data``, writing only when it differs."""
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=pfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _err(errno.EINVAL, "not a regular file")
            if st.st_size == len(data) and _pread_all(fd, len(data)) == data:
                return
            _write_all(fd, data)
        finally:
            os.close(fd)

    def _finish(self, pfd: int, name: bytes, t: str, meta: Meta | None,
                data: bytes | None) -> None:
        if t == T_FILE and data is not None:
            self._write_data(pfd, name, data)
        if meta:
            if t == T_DIR:
                dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
                try:
                    self.apply_meta_fd(dfd, meta)
                finally:
                    os.close(dfd)
            else:
                self._apply_meta_at(pfd, name, meta, t)

    def _apply_meta_at(self, dir_fd: int, name: bytes, meta: Meta, t: str) -> None:
        """Meta of a non-directory by name, never following it (no fd needed)."""
        if is_root() and "uid" in meta and "gid" in meta:
            os.chown(name, meta["uid"], meta["gid"], dir_fd=dir_fd, follow_symlinks=False)
        wanted = _wanted_xattrs(meta, t)
        if wanted is not None:
            xattrs.apply(name, wanted, dir_fd=dir_fd, scope=self.xattr_scope)
        if t != T_SYMLINK and "mode" in meta:
            os.chmod(name, stat.S_IMODE(meta["mode"]), dir_fd=dir_fd, follow_symlinks=False)
        if "mtime" in meta:
            mtime = meta["mtime"]
            os.utime(name, ns=(meta.get("atime", mtime), mtime), dir_fd=dir_fd,
                     follow_symlinks=False)

    # -- public metadata -----------------------------------------------------------

    def apply_meta_fd(self, fd: int, meta: Meta, *, is_symlink: bool = False) -> None:
        """Apply meta to an open object: chown (root), xattrs, chmod, times last.

        chown goes first because it clears setuid/setgid. With ``is_symlink`` the fd is an
        O_PATH|O_NOFOLLOW fd of the symlink; the kernel offers no xattr calls on such fds,
        so xattrs are left alone there (by-gfid meta ops handle symlink xattrs by name).
        """
        if is_symlink:
            # The /proc magic link resolves to the symlink itself, not to its target.
            path = b"/proc/self/fd/%d" % fd
            if is_root() and "uid" in meta and "gid" in meta:
                os.chown(path, meta["uid"], meta["gid"])
            if "mtime" in meta:
                os.utime(path, ns=(meta.get("atime", meta["mtime"]), meta["mtime"]))
            return
        if is_root() and "uid" in meta and "gid" in meta:
            os.chown(fd, meta["uid"], meta["gid"])
        wanted = meta.get("xattrs")
        if wanted is not None:
            xattrs.apply(fd, wanted, scope=self.xattr_scope)
        if "mode" in meta:
            os.chmod(fd, stat.S_IMODE(meta["mode"]))
        if "mtime" in meta:
            os.utime(fd, ns=(meta.get("atime", meta["mtime"]), meta["mtime"]))

    # -- entry operations ----------------------------------------------------------

    def ensure(self, pgfid: bytes, name: bytes, gfid: bytes, type: str, *,
               meta: Meta | None = None, target: bytes | None = None, rdev: int = 0,
               data: bytes | None = None) -> str:
        """Make ``(pgfid, name)`` be object ``gfid``, reusing it if it exists anywhere.

        Returns kept / adopted / linked / renamed / created; raises OSError on failure.
        """
        t = type
        check_gfid(gfid)
        if gfid in RESERVED_GFIDS:
            raise _err(errno.EINVAL, "reserved gfid")
        if t not in ENTRY_TYPES:
            raise _err(errno.EINVAL, f"unknown type {t!r}")
        if t == T_SYMLINK and (not isinstance(target, bytes) or not 0 < len(target) < 4096
                               or b"\0" in target):
            raise _err(errno.EINVAL, "bad symlink target")
        if data is not None and not isinstance(data, bytes):
            raise _err(errno.EINVAL, "data is not bytes")
        pfd = self._need_parent(pgfid, name)
        if t == T_FILE and not self.index.has(gfid):
            # A file whose identity the secondary does not know yet (every file of a first
            # sync): create it straight away.  O_EXCL finds a taken name, which then goes
            # the general way below; nothing was changed.
            fd = self._open_new_file(pfd, name)
            if fd is not None:
                self._fill_new_file(fd, pfd, name, gfid, data, meta)
                return "created"
        st = lstat_if_present(pfd, name)
        saved: Times | None = None
        replaced: bytes | None = None
        if st is not None:
            cur = self._gfid_at(pfd, name, st, hint=gfid)
            same = self._same_kind(pfd, name, st, t, target, rdev)
            if cur == gfid and same:
                self._keep_index(pfd, pgfid, name, st, gfid, t)
                self._finish(pfd, name, t, meta, data)
                return "kept"
            if cur is None and same and (t == T_DIR or st.st_nlink == 1) \
                    and not self._known_elsewhere(gfid, t, st):
                # (A nameless hardlink may be a planted link to a file outside the root:
                # never adopted, replaced by a private object below.)
                self._set_gfid(pfd, name, gfid, t)
                self._keep_index(pfd, pgfid, name, st, gfid, t)
                self._finish(pfd, name, t, meta, data)
                return "adopted"
            saved = _times(pfd)
            if t != T_DIR and not stat.S_ISDIR(st.st_mode) and cur != gfid \
                    and self._reusable(gfid, t, target, rdev):
                # Left in place: the link below replaces it atomically.
                replaced = cur
            else:
                self._evict(pfd, pgfid, name, st, cur)
                if cur == gfid:
                    # Same identity, other kind of object: that identity is not reusable.
                    self.index.remove(gfid)
                    self.index.forget_dir(gfid)
        # The parent's times are read only when they will be restored: a plain create
        # leaves them to the parent's own meta op (no fstat on the hot path).
        status, taken = self._reuse(pfd, pgfid, name, gfid, t, replaced, target, rdev)
        if status is None:
            self._create(pfd, pgfid, name, gfid, t, target, rdev, data, meta)
            status = "created"
        else:
            self._finish(pfd, name, t, meta, data)
        before = saved if saved is not None else taken
        if before is not None:
            self._restore(pfd, before)
        return status

    def _keep_index(self, pfd: int, pgfid: bytes, name: bytes, st: os.stat_result,
                    gfid: bytes, t: str) -> None:
        # Repairs a missing or stale index entry for an object found in place.
        if t == T_DIR:
            self.index.set_dir(gfid, pgfid, name)
        else:
            self.index.set_link(gfid, pfd, name, st.st_ino)

    def _known_elsewhere(self, gfid: bytes, t: str, st: os.stat_result) -> bool:
        if t == T_DIR:
            fd = self.index.dir_fd(gfid)
            return fd is not None and os.fstat(fd).st_ino != st.st_ino
        ist = self._index_obj(gfid, t)
        return ist is not None and ist.st_ino != st.st_ino

    def _reuse(self, pfd: int, pgfid: bytes, name: bytes, gfid: bytes, t: str,
               replaced: bytes | None, target: bytes | None = None,
               rdev: int = 0) -> tuple[str | None, Times | None]:
        """Bring existing object ``gfid`` to the (free or replaceable) name, if it exists.

        Returns the status (None: nothing to reuse, pfd untouched) and the times of
        ``pfd`` read just before it was changed, for the caller to restore.
        """
        if t == T_DIR:
            found = self._find_dir(gfid)
            if found is None:
                return None, None
            _, spfd, sname = found
            ttimes = _times(pfd)
            stimes = _times(spfd)
            os.rename(sname, name, src_dir_fd=spfd, dst_dir_fd=pfd)
            self.index.set_dir(gfid, pgfid, name)
            if spfd != pfd:
                self._restore(spfd, stimes)
            self._restore(pfd, ttimes)
            return "renamed", ttimes
        if not self._reusable(gfid, t, target, rdev):
            return None, None
        idx = self.index.idx_dir(gfid)
        assert idx is not None
        ttimes = _times(pfd)
        tmp = _TMP_PREFIX + new_gfid().hex().encode()
        os.link(hexname(gfid), tmp, src_dir_fd=idx, dst_dir_fd=pfd, follow_symlinks=False)
        try:
            if replaced is not None:
                self.index.add_orphan(replaced)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        finally:
            # rename() between two links of one inode does nothing: drop the spare name.
            try:
                os.unlink(tmp, dir_fd=pfd)
            except FileNotFoundError:
                pass
        return "linked", ttimes

    def _create(self, pfd: int, pgfid: bytes, name: bytes, gfid: bytes, t: str,
                target: bytes | None, rdev: int, data: bytes | None,
                meta: Meta | None = None) -> None:
        """Create a new object: gfid and index entry first, then content, then meta.

        Files and directories get their meta through the fd still open from the create
        (no name lookups): this is the hot path of a first sync.
        """
        if t == T_FILE:
            fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=pfd)
            self._fill_new_file(fd, pfd, name, gfid, data, meta)
            return
        if t == T_DIR:
            os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                xattrs.set(fd, GFID_XATTR, gfid)
                self.index.set_dir(gfid, pgfid, name)
                if meta:
                    self.apply_meta_fd(fd, meta)
            except BaseException:
                os.close(fd)
                raise
            self.index.dirs.put(gfid, fd)
            return
        if t == T_SYMLINK:
            assert target is not None
            os.symlink(target, name, dir_fd=pfd)
        else:
            if t in (T_CHR, T_BLK) and not is_root():
                raise _err(errno.EPERM, "device nodes need root; the secondary runs "
                                        "unprivileged")
            os.mknod(name, _MKNOD_FMT[t] | 0o600, rdev, dir_fd=pfd)
        self._set_gfid(pfd, name, gfid, t)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        self.index.set_link(gfid, pfd, name, st.st_ino)
        if meta:
            self._apply_meta_at(pfd, name, meta, t)

    @staticmethod
    def _open_new_file(pfd: int, name: bytes) -> int | None:
        """fd of a new, empty file ``name``; None (nothing done) when the name is taken."""
        try:
            return os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=pfd)
        except FileExistsError:
            return None

    def _fill_new_file(self, fd: int, pfd: int, name: bytes, gfid: bytes,
                       data: bytes | None, meta: Meta | None) -> None:
        """gfid, index entry, content and meta of the file just created on ``fd``; closes it."""
        try:
            xattrs.set(fd, GFID_XATTR, gfid)
            # The inode number is only needed if the index entry is taken: read from the
            # fd then (set_link), not by an fstat per created file.
            self.index.set_link(gfid, pfd, name, None, fd=fd)
            if data:
                # A new, empty file: writing the data gives it exactly its size.
                _pwrite_all(fd, data)
            if meta:
                self.apply_meta_fd(fd, meta)
        finally:
            os.close(fd)

    def delete(self, pgfid: bytes, name: bytes, gfid: bytes) -> str:
        """Remove ``name`` if it holds ``gfid``: deleted / absent / other.

        A file is unlinked (its index link keeps it until end_crawl, in case it shows up
        elsewhere); a directory goes to limbo for the same reason.
        """
        check_gfid(gfid)
        if gfid in RESERVED_GFIDS:
            raise _err(errno.EINVAL, "reserved gfid")
        pfd = self._parent(pgfid, name)
        if pfd is None:
            return "absent"
        st = lstat_or_none(pfd, name)
        if st is None:
            return "absent"
        if gfid == NO_GFID:
            # A leftover without identity (e.g. from a pre-seeded copy) the primary lacks.
            if self._gfid_at(pfd, name, st) is not None:
                return "other"
            self._evict(pfd, pgfid, name, st, None)
            return "deleted"
        if self._gfid_at(pfd, name, st, hint=gfid) != gfid:
            return "other"
        self._evict(pfd, pgfid, name, st, gfid)
        return "deleted"

    def rename(self, gfid: bytes, pgfid: bytes, name: bytes, npgfid: bytes, nname: bytes,
               type: str) -> str:
        """Rename object ``gfid`` from ``(pgfid, name)`` to ``(npgfid, nname)``.

        renamed / kept; when the source no longer holds it but the gfid lives elsewhere,
        falls back to ensure at the target; an unknown gfid is ENOENT.
        """
        check_gfid(gfid)
        if gfid in RESERVED_GFIDS:
            raise _err(errno.EINVAL, "reserved gfid")
        check_name(name)
        tpfd = self._need_parent(npgfid, nname)
        tst = lstat_or_none(tpfd, nname)
        tcur = self._gfid_at(tpfd, nname, tst, hint=gfid) if tst is not None else None
        if tcur == gfid:
            return "kept"
        spfd = self._parent(pgfid, name)
        sst = lstat_or_none(spfd, name) if spfd is not None else None
        if spfd is not None and sst is not None \
                and self._gfid_at(spfd, name, sst, hint=gfid) == gfid:
            stimes, ttimes = _times(spfd), _times(tpfd)
            sdir = stat.S_ISDIR(sst.st_mode)
            if tst is not None:
                if stat.S_ISDIR(tst.st_mode) or sdir:
                    self._evict(tpfd, npgfid, nname, tst, tcur)
                elif tcur is not None:
                    self.index.add_orphan(tcur)
            os.rename(name, nname, src_dir_fd=spfd, dst_dir_fd=tpfd)
            if sdir:
                self.index.set_dir(gfid, npgfid, nname)
            self._restore(tpfd, ttimes)
            if spfd != tpfd:
                self._restore(spfd, stimes)
            return "renamed"
        if type == T_DIR:
            known = self.index.dir_fd(gfid) is not None
        else:
            known = self._index_obj(gfid, type) is not None
        if not known:
            raise _err(errno.ENOENT, "gfid unknown")
        target = None
        if type == T_SYMLINK:
            idx = self.index.idx_dir(gfid)
            assert idx is not None
            target = os.readlink(hexname(gfid), dir_fd=idx)
        return self.ensure(npgfid, nname, gfid, type, target=target)

    def meta(self, gfid: bytes, meta: Meta) -> str:
        """Apply meta to object ``gfid`` wherever it is: ``applied``; unknown is ENOENT."""
        check_gfid(gfid)
        if gfid == ROOT_GFID:
            self.apply_meta_fd(self.root_fd, meta)
            return "applied"
        st = self.index.lstat(gfid)
        if st is None:
            raise _err(errno.ENOENT, "gfid unknown")
        if not self.index.is_object(gfid, st):
            fd = self.index.dir_fd(gfid)
            if fd is None:
                raise _err(errno.ENOENT, "directory gfid stale")
            self.apply_meta_fd(fd, meta)
            return "applied"
        idx = self.index.idx_dir(gfid)
        assert idx is not None
        self._apply_meta_at(idx, hexname(gfid), meta, type_of(st.st_mode))
        return "applied"

    # -- named primitives (each idempotent and gfid-checked) -----------------------

    def create(self, pgfid: bytes, name: bytes, gfid: bytes, *, meta: Meta | None = None,
               data: bytes | None = None) -> str:
        """CREATE a regular file (or keep/link the existing one)."""
        return self.ensure(pgfid, name, gfid, T_FILE, meta=meta, data=data)

    def mkdir(self, pgfid: bytes, name: bytes, gfid: bytes, *,
              meta: Meta | None = None) -> str:
        """MKDIR (or keep / rename back the existing directory)."""
        return self.ensure(pgfid, name, gfid, T_DIR, meta=meta)

    def symlink(self, pgfid: bytes, name: bytes, gfid: bytes, target: bytes, *,
                meta: Meta | None = None) -> str:
        """SYMLINK."""
        return self.ensure(pgfid, name, gfid, T_SYMLINK, target=target, meta=meta)

    def mknod(self, pgfid: bytes, name: bytes, gfid: bytes, type: str, *, rdev: int = 0,
              meta: Meta | None = None) -> str:
        """MKNOD of a fifo, socket or device."""
        if type not in _MKNOD_FMT:
            raise _err(errno.EINVAL, "not a mknod type")
        return self.ensure(pgfid, name, gfid, type, rdev=rdev, meta=meta)

    def link(self, pgfid: bytes, name: bytes, gfid: bytes) -> str:
        """LINK: give existing non-directory ``gfid`` the name; ENOENT if it is unknown."""
        check_gfid(gfid)
        st = self.index.lstat(gfid)
        if st is None or not self.index.is_object(gfid, st):
            raise _err(errno.ENOENT, "gfid unknown")
        t = type_of(st.st_mode)
        target = None
        if t == T_SYMLINK:
            idx = self.index.idx_dir(gfid)
            assert idx is not None
            target = os.readlink(hexname(gfid), dir_fd=idx)
        return self.ensure(pgfid, name, gfid, t, target=target)

    def unlink(self, pgfid: bytes, name: bytes, gfid: bytes) -> str:
        """UNLINK a non-directory holding ``gfid``: deleted / absent / other."""
        pfd = self._parent(pgfid, name)
        st = lstat_or_none(pfd, name) if pfd is not None else None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise _err(errno.EISDIR, "is a directory")
        return self.delete(pgfid, name, gfid)

    def rmdir(self, pgfid: bytes, name: bytes, gfid: bytes) -> str:
        """RMDIR: an empty directory is removed, a non-empty one goes to limbo."""
        check_gfid(gfid)
        pfd = self._parent(pgfid, name)
        st = lstat_or_none(pfd, name) if pfd is not None else None
        if pfd is None or st is None:
            return "absent"
        if not stat.S_ISDIR(st.st_mode):
            raise _err(errno.ENOTDIR, "not a directory")
        if self._gfid_at(pfd, name, st) != gfid:
            return "other"
        try:
            os.rmdir(name, dir_fd=pfd)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            self._to_limbo(pfd, pgfid, name, gfid)
            return "deleted"
        self.index.forget_dir(gfid)
        if self.index.dir_target(gfid) == (pgfid, name):
            self.index.remove(gfid)
        return "deleted"

    # -- queries -------------------------------------------------------------------

    def _describe(self, st: os.stat_result, target: int | bytes, dir_fd: int | None,
                  nlink: int) -> list:
        dig = xattrs.digest(xattrs.read_replicated(target, dir_fd=dir_fd,
                                                   scope=self.xattr_scope))
        return _row(st, dig, nlink)

    def list_dir(self, gfid: bytes, names: list[bytes] | None = None) -> list[list]:
        """Entries of directory ``gfid`` as [name, gfid|None, type, mode, uid, gid, size,
        mtime_ns, xattr_digest, nlink] (nlink without our index link); NotFound if unknown.
        With ``names``, only those entries (the ones that exist), without reading the
        directory: the live crawl's re-check of the names its journal records name.

        Also re-records index entries found missing or stale, so the index heals itself.
        """
        check_gfid(gfid)
        cached = self.index.dir_fd(gfid)
        if cached is None:
            raise NotFound(f"unknown directory gfid {gfid.hex()}")
        # Our own fd: healing entries resolves other directories, which may evict this one.
        fd = os.dup(cached)
        try:
            return self._list(fd, gfid, names)
        finally:
            os.close(fd)

    def _list(self, fd: int, gfid: bytes, names: list[bytes] | None = None) -> list[list]:
        out: list[list] = []
        listed = (sorted(set(names)) if names is not None
                  else [os.fsencode(n) for n in sorted(os.listdir(fd))])
        for name in listed:
            if gfid == ROOT_GFID and name == META_DIR:
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            try:
                g = _raw_gfid(xattrs.get(name, GFID_XATTR, dir_fd=fd))
                if g is None and xattrless(st.st_mode):
                    g = self.index.ino_gfid(st)
                nlink = st.st_nlink
                if g is not None and gfid != LIMBO_GFID:
                    try:
                        nlink -= self._heal_index(fd, gfid, name, st, g)
                    except FileNotFoundError:
                        raise
                    except OSError:
                        # Healing is a repair on the side (a full disk, a full index
                        # directory): the listing is still right, the missing index link
                        # is not counted, and the next listing tries again.
                        pass
                out.append([name, g, *self._describe(st, name, fd, nlink)])
            except FileNotFoundError:
                continue
            except PermissionError:
                # An entry this host may not read (its xattrs: an unprivileged host and a
                # mode-000 object): listed without identity or xattr digest, so the
                # primary's ops on it fail one by one instead of the whole listing.
                out.append([name, None, *_row(st, b"", st.st_nlink)])
        return out

    def _heal_index(self, fd: int, pgfid: bytes, name: bytes, st: os.stat_result,
                    g: bytes) -> int:
        """Repair the index for a listed object; 1 if its index link counts in st_nlink."""
        if stat.S_ISDIR(st.st_mode):
            if self.index.dir_target(g) != (pgfid, name):
                cur = self.index.dir_fd(g)
                if cur is None or os.fstat(cur).st_ino == st.st_ino:
                    self.index.forget_dir(g)
                    self.index.set_dir(g, pgfid, name)
            return 0
        ist = self.index.lstat(g, likely=True)
        if ist is None:
            self.index.set_link(g, fd, name, st.st_ino)
            return 1
        return 1 if ist.st_ino == st.st_ino else 0

    def stat_gfid(self, gfid: bytes) -> list | None:
        """[type, mode, uid, gid, size, mtime_ns, xattr_digest, nlink] of ``gfid``, or None."""
        check_gfid(gfid)
        st = self.index.lstat(gfid) if gfid not in RESERVED_GFIDS else None
        if gfid in RESERVED_GFIDS or (st is not None and not self.index.is_object(gfid, st)):
            fd = self.index.dir_fd(gfid)
            if fd is None:
                return None
            return self._describe(os.fstat(fd), fd, None, os.fstat(fd).st_nlink)
        if st is None:
            return None
        idx = self.index.idx_dir(gfid)
        assert idx is not None
        return self._describe(st, hexname(gfid), idx, st.st_nlink - 1)

    def lookup(self, gfids: list[bytes]) -> list[str | None]:
        """For each gfid, the type of the object the secondary has for it, or None.

        Only the index is consulted, which is enough because an index entry, once made,
        stays until end_crawl: a "yes" cannot turn stale within a crawl.
        """
        out: list[str | None] = []
        for gfid in gfids:
            row = self.stat_gfid(gfid)
            out.append(None if row is None else row[0])
        return out

    def open_data(self, gfid: bytes) -> int:
        """Open regular file ``gfid`` read-write through its index link; NotFound if none."""
        check_gfid(gfid)
        st = self.index.lstat(gfid)
        idx = self.index.idx_dir(gfid)
        if st is None or idx is None or not stat.S_ISREG(st.st_mode):
            raise NotFound(f"unknown file gfid {gfid.hex()}")
        fd = os.open(hexname(gfid), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=idx)
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or fst.st_ino != st.st_ino:
            os.close(fd)
            raise NotFound(f"file gfid {gfid.hex()} changed while opening")
        try:
            own = xattrs.get(fd, GFID_XATTR) == gfid
        except OSError:
            own = False
        if not own:
            # Not our object (e.g. a hardlink planted in the index): never write through it.
            os.close(fd)
            raise NotFound(f"index entry of file gfid {gfid.hex()} is not that file")
        return fd

    # -- end of crawl, durability --------------------------------------------------

    def end_crawl(self) -> int:
        """Purge limbo and index links of objects left with no name; returns the count.

        Every step is idempotent, so running it again after a crash finishes the job.
        """
        purged = 0
        limbo = self.index.limbo_fd
        for sname in os.listdir(limbo):
            purged += self._purge(limbo, os.fsencode(sname))
        for g in dict.fromkeys(self.index.orphans()):
            st = self.index.lstat(g)
            if st is not None and st.st_nlink == 1 and self.index.is_object(g, st):
                self.index.remove(g)
                purged += 1
        self.index.clear_orphans()
        return purged

    def _purge(self, pfd: int, name: bytes) -> int:
        """Remove ``name`` recursively through fds, dropping index entries it leaves dead."""
        st = lstat_or_none(pfd, name)
        if st is None:
            return 0
        try:
            g = _raw_gfid(xattrs.get(name, GFID_XATTR, dir_fd=pfd))
        except OSError:
            g = None
        count = 0
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                for sname in os.listdir(fd):
                    count += self._purge(fd, os.fsencode(sname))
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=pfd)
            if g is not None:
                self.index.forget_dir(g)
                if self.index.dir_target(g) is not None and self.index.dir_fd(g) is None:
                    self.index.remove(g)
        else:
            os.unlink(name, dir_fd=pfd)
            if g is not None:
                ist = self.index.lstat(g)
                if ist is not None and ist.st_nlink == 1 and self.index.is_object(g, ist):
                    self.index.remove(g)
        return count + 1

    def commit(self) -> None:
        """Make everything applied so far durable (syncfs of the root's filesystem)."""
        blocks.syncfs(self.root_fd)


def _label(op: object) -> object:
    if not isinstance(op, dict):
        return op
    for key in ("name", "nname"):
        if isinstance(op.get(key), bytes):
            return op[key]
    g = op.get("gfid")
    return g.hex() if isinstance(g, bytes) else None
