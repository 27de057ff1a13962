"""ctypes bindings for inotify (the recorder's fallback when fanotify is unavailable).

``inotify_simple`` would do, but it is not installed here and the API is three calls.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def init(flags: int = IN_NONBLOCK | IN_CLOEXEC) -> int:
    """``inotify_init1``."""
    return _check(_libc.inotify_init1(flags), "inotify_init1")


def add_watch(fd: int, path: bytes, mask: int) -> int:
    """``inotify_add_watch``: the watch descriptor."""
    return _check(_libc.inotify_add_watch(fd, path, mask), "inotify_add_watch")


def rm_watch(fd: int, wd: int) -> None:
    """``inotify_rm_watch``; a watch that is already gone is not an error."""
    if _libc.inotify_rm_watch(fd, wd) < 0 and ctypes.get_errno() != 22:  # EINVAL: gone
        _check(-1, "inotify_rm_watch")


class Event(NamedTuple):
    """One inotify event; ``name`` is b"" for events on the watched directory itself."""

    wd: int
    mask: int
    cookie: int
    name: bytes


def parse(buf: bytes) -> Iterator[Event]:
    """Decode a buffer returned by ``read`` on an inotify fd."""
    off = 0
    while off + _EVENT.size <= len(buf):
        wd, mask, cookie, n = _EVENT.unpack_from(buf, off)
        start = off + _EVENT.size
        name = buf[start:start + n].rstrip(b"\0")
        yield Event(wd, mask, cookie, name)
        off = start + n
