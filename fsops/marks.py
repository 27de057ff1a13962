"""Durable marks on the primary brick root: entry_stime and stime.

A mark is a wall-clock time (seconds, nanoseconds) stored as 16 bytes (two big-endian
u64) in ``<prefix>georep.<session>.entry_stime`` / ``.stime`` on the brick root.
Everything changed on the primary before ``entry_stime`` has its entry ops on the
secondary; before ``stime``, its data and meta too.  Marks are written only after the
secondary has reported the work durable (see docs/durability.md).
"""

from __future__ import annotations

import errno
import struct

from fsops import xattrs
from fsops.constants import xattr_prefix
from fsops.primary import PrimaryError

_FMT = ">QQ"


def _name(session: str, which: str) -> bytes:
    return xattr_prefix() + b"georep." + session.encode() + b"." + which.encode()


def read_mark(root_fd: int, session: str, which: str) -> int | None:
    """The mark in nanoseconds since the epoch, or None when never set."""
    raw = xattrs.get(root_fd, _name(session, which))
    if raw is None or len(raw) != 16:
        return None
    sec, nsec = struct.unpack(_FMT, raw)
    return sec * 1_000_000_000 + nsec


class MarkError(PrimaryError):
    """A mark cannot be stored on the primary root (one line for people)."""


def write_mark(root_fd: int, session: str, which: str, ns: int) -> None:
    """Store a mark (``which`` is ``entry_stime`` or ``stime``); MarkError if it cannot be."""
    try:
        xattrs.set(root_fd, _name(session, which),
                   struct.pack(_FMT, *divmod(ns, 1_000_000_000)))
    except OSError as e:
        hint = ""
        if e.errno in (errno.ENOSPC, errno.E2BIG):
            # ext4 keeps a directory's xattrs in one block: about 30 sessions' marks.
            hint = (" (the root's room for xattrs is full: every session keeps two marks "
                    "there; remove the marks of sessions no longer used, "
                    f"{_name('<session>', '*').decode()}, with setfattr -x)")
        raise MarkError(f"cannot record the {which} mark of session {session} on the "
                        f"primary root: {e.strerror}{hint}") from e
