"""gfids on the primary: read, assign on first sight, and detect copied identities.

The primary stores ``gfid (16 bytes) + st_ino (8 bytes, little-endian)`` in the gfid
xattr.  A file copied with its xattrs (``cp -a``, ``rsync -X``) carries a gfid that is
not its own; the inode number tells us, and the copy gets a fresh gfid instead of
being hardlinked to the original on the secondary.  A bare 16-byte value (written by a
secondary that became a primary) is accepted and bound to its inode.
"""

from __future__ import annotations

import errno
import os
import uuid

from fsops import xattrs
from fsops.constants import GFID_XATTR


def new_gfid() -> bytes:
    """A fresh random gfid."""
    return uuid.uuid4().bytes


def _encode(gfid: bytes, ino: int) -> bytes:
    return gfid + ino.to_bytes(8, "little")


def read_gfid(fd_or_name: int | bytes, ino: int, *, dir_fd: int | None = None) -> bytes | None:
    """The gfid recorded for the object, or None when it has none of its own."""
    raw = xattrs.get(fd_or_name, GFID_XATTR, dir_fd=dir_fd)
    if raw is None:
        return None
    if len(raw) == 24 and int.from_bytes(raw[16:], "little") == ino:
        return raw[:16]
    if len(raw) == 16:
        return raw
    return None


def ensure_gfid(fd_or_name: int | bytes, ino: int, *, dir_fd: int | None = None) -> bytes:
    """Return the object's gfid, assigning one race-free if it has none (or a copied one).

    Assignment uses XATTR_CREATE; when another process won the race (EEXIST), its
    value is re-read and used.
    """
    raw = xattrs.get(fd_or_name, GFID_XATTR, dir_fd=dir_fd)
    if raw is not None:
        if len(raw) == 24 and int.from_bytes(raw[16:], "little") == ino:
            return raw[:16]
        if len(raw) == 16:
            xattrs.set(fd_or_name, GFID_XATTR, _encode(raw, ino), dir_fd=dir_fd,
                       flags=os.XATTR_REPLACE)
            return raw
        # Copied from another inode, or garbage: this object gets an identity of its own.
        gfid = new_gfid()
        xattrs.set(fd_or_name, GFID_XATTR, _encode(gfid, ino), dir_fd=dir_fd,
                   flags=os.XATTR_REPLACE)
        return gfid
    gfid = new_gfid()
    try:
        xattrs.set(fd_or_name, GFID_XATTR, _encode(gfid, ino), dir_fd=dir_fd,
                   flags=os.XATTR_CREATE)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        return ensure_gfid(fd_or_name, ino, dir_fd=dir_fd)
    return gfid
