"""Names and fixed identities shared by the primary and the secondary."""

from __future__ import annotations

import functools
import os

#: gfid of every brick root and of the secondary root (a root is the same object on both sides).
ROOT_GFID = b"\x00" * 15 + b"\x01"
#: Pseudo parent of directories evicted into ``.georep/limbo`` on the secondary.
LIMBO_GFID = b"\x00" * 15 + b"\x02"
#: In a ``delete``: "the object at this name that has no gfid" (a pre-seeded leftover).
NO_GFID = b"\x00" * 16
RESERVED_GFIDS = frozenset({ROOT_GFID, LIMBO_GFID})

#: Name of the secondary's private directory; never replicated, reserved at a primary root.
META_DIR = b".georep"

#: Entry types as they travel on the wire.
T_FILE, T_DIR, T_SYMLINK, T_FIFO, T_CHR, T_BLK, T_SOCK = "f", "d", "l", "p", "c", "b", "s"
ENTRY_TYPES = frozenset({T_FILE, T_DIR, T_SYMLINK, T_FIFO, T_CHR, T_BLK, T_SOCK})

NAME_MAX = 255


@functools.cache
def is_root() -> bool:
    """True when this process may use ``trusted.*`` xattrs, chown and device nodes."""
    return os.geteuid() == 0


def xattr_prefix() -> bytes:
    """Namespace of georep's own xattrs: ``trusted.`` as root, ``user.`` otherwise."""
    return b"trusted." if is_root() else b"user."


GFID_XATTR = xattr_prefix() + b"georep.gfid"
#: Every xattr under this prefix is georep's own and never replicated.
OWN_XATTR_PREFIXES = (b"trusted.georep.", b"user.georep.")
