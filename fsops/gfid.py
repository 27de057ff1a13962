"""gfids on the primary: read, assign on first sight, and detect copied identities.

The primary stores ``gfid (16 bytes) + st_ino (8 bytes, little-endian)`` in the gfid
xattr.  A file copied with its xattrs (``cp -a``, ``rsync -X``) carries a gfid that is
not its own; the inode number tells us, and the copy gets a fresh gfid instead of
being hardlinked to the original on the secondary.  A bare 16-byte value (written by a
secondary that became a primary) is accepted and bound to its inode.

Unprivileged, the gfid xattr is ``user.georep.gfid``, and the kernel refuses ``user.*``
xattrs on anything but regular files and directories (EPERM to set, ENODATA to read).
Symlinks, fifos, sockets and device nodes then get a *derived* gfid instead:
``blake2b("georep-noxattr" + st_dev + st_ino + type [+ rdev] [+ symlink target])``.  It
is stable for the inode's life (a symlink's target never changes) and shared by its
hardlinks, so a rename is still one ``ensure`` of the same gfid.  An inode number reused
after a deletion gives a different gfid unless the new object has the same type and
target or device (then it is the same object in all that replicates, only its meta may
differ).  Should a known gfid still arrive with another kind or target, the secondary's
``ensure`` replaces the object.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid

from fsops import xattrs
from fsops.constants import GFID_XATTR, is_root


def new_gfid() -> bytes:
    """A fresh random gfid."""
    return uuid.uuid4().bytes


def derived_gfid(st: os.stat_result, target: bytes | None = None) -> bytes:
    """The gfid of an object that cannot carry the gfid xattr (see the module docstring).

    ``target``: a symlink's target (immutable for the inode's life, so part of its
    identity); the type and, for devices, ``st_rdev`` are hashed too.
    """
    h = hashlib.blake2b(b"georep-noxattr", digest_size=16)
    h.update(st.st_dev.to_bytes(8, "little"))
    h.update(st.st_ino.to_bytes(8, "little"))
    h.update(stat.S_IFMT(st.st_mode).to_bytes(4, "little"))
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        h.update(st.st_rdev.to_bytes(8, "little"))
    if target is not None:
        h.update(target)
    return h.digest()


def derived_at(fd_or_name: int | bytes, st: os.stat_result, *,
               dir_fd: int | None = None) -> bytes:
    """:func:`derived_gfid` of an xattr-less object, reading a symlink's target.

    ``fd_or_name``: a name under ``dir_fd``, or an ``O_PATH | O_NOFOLLOW`` fd of it.
    """
    target = None
    if stat.S_ISLNK(st.st_mode):
        if isinstance(fd_or_name, int):
            target = os.readlink(b"", dir_fd=fd_or_name)
        else:
            target = os.readlink(fd_or_name, dir_fd=dir_fd)
    return derived_gfid(st, target)


def xattrless(mode: int) -> bool:
    """True when an object of this ``st_mode`` cannot carry the gfid xattr (unprivileged,
    anything but a regular file or a directory)."""
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and not is_root()


def _encode(gfid: bytes, ino: int) -> bytes:
    return gfid + ino.to_bytes(8, "little")


def read_gfid(fd_or_name: int | bytes, ino: int, *, dir_fd: int | None = None,
              st: os.stat_result | None = None) -> bytes | None:
    """The gfid recorded for the object, or None when it has none of its own.

    With ``st`` (the object's lstat), an object that cannot carry the xattr gets its
    derived gfid.
    """
    if st is not None and xattrless(st.st_mode):
        return derived_at(fd_or_name, st, dir_fd=dir_fd)
    raw = xattrs.get(fd_or_name, GFID_XATTR, dir_fd=dir_fd)
    if raw is None:
        return None
    if len(raw) == 24 and int.from_bytes(raw[16:], "little") == ino:
        return raw[:16]
    if len(raw) == 16:
        return raw
    return None


def ensure_gfid(fd_or_name: int | bytes, ino: int, *, dir_fd: int | None = None,
                st: os.stat_result | None = None) -> bytes:
    """Return the object's gfid, assigning one race-free if it has none (or a copied one).

    Assignment uses XATTR_CREATE; when another process won the race (EEXIST), its
    value is re-read and used.  With ``st`` (the object's lstat), an object that cannot
    carry the xattr (unprivileged: symlinks and special files) gets its derived gfid.
    """
    return gfid_of(fd_or_name, ino, dir_fd=dir_fd, st=st)[0]


def gfid_of(fd_or_name: int | bytes, ino: int, *, dir_fd: int | None = None,
            st: os.stat_result | None = None) -> tuple[bytes, bool]:
    """:func:`ensure_gfid`, and whether this call minted the gfid: a new random value,
    which no secondary can know yet."""
    if st is not None and xattrless(st.st_mode):
        return derived_at(fd_or_name, st, dir_fd=dir_fd), False
    raw = xattrs.get(fd_or_name, GFID_XATTR, dir_fd=dir_fd)
    if raw is not None:
        if len(raw) == 24 and int.from_bytes(raw[16:], "little") == ino:
            return raw[:16], False
        if len(raw) == 16:
            _set(fd_or_name, _encode(raw, ino), dir_fd, os.XATTR_REPLACE)
            return raw, False
        # Copied from another inode, or garbage: this object gets an identity of its own.
        gfid = new_gfid()
        _set(fd_or_name, _encode(gfid, ino), dir_fd, os.XATTR_REPLACE)
        return gfid, True
    gfid = new_gfid()
    try:
        _set(fd_or_name, _encode(gfid, ino), dir_fd, os.XATTR_CREATE)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        return gfid_of(fd_or_name, ino, dir_fd=dir_fd, st=st)[0], False
    return gfid, True


def _set(target: int | bytes, value: bytes, dir_fd: int | None, flags: int) -> None:
    try:
        xattrs.set(target, GFID_XATTR, value, dir_fd=dir_fd, flags=flags)
    except PermissionError:
        if is_root():
            raise
        if not _set_as_owner(target, value, dir_fd, flags):
            raise


def _set_as_owner(target: int | bytes, value: bytes, dir_fd: int | None, flags: int) -> bool:
    """Set the gfid on a read-only file or directory of our own; False if it is not ours.

    ``user.*`` xattrs need write permission, which root has anyway.  Unprivileged, the
    owner of a read-only object (mode 0444, 0555...) may chmod it: it is made writable by
    its owner for the instant of the set, through an ``O_PATH`` fd (never a re-walk of the
    name), and its mode put back.  Setting an xattr changes the ctime anyway.
    """
    if isinstance(target, int):
        fd = os.open(b"/proc/self/fd/%d" % target, os.O_PATH | os.O_CLOEXEC)
    else:
        fd = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & stat.S_IWUSR or stat.S_ISLNK(st.st_mode):
            return False
        # The magic link names the object itself; fchmod/fsetxattr refuse O_PATH fds.
        path = b"/proc/self/fd/%d" % fd
        os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
        try:
            os.setxattr(path, GFID_XATTR, value, flags)
        finally:
            os.chmod(path, stat.S_IMODE(st.st_mode))
        return True
    finally:
        os.close(fd)
