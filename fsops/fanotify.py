"""ctypes bindings for fanotify (FID reporting mode) and file handles.

No maintained Python package exists (pyfanotify drops events and mis-reports
cross-directory renames, see /work/shared/NOTES-libraries.md), so this is the small part
of <linux/fanotify.h> the recorder needs: init, mark, the event parser, and
``name_to_handle_at`` / ``open_by_handle_at``.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

FAN_CLOEXEC = 0x1
FAN_UNLIMITED_QUEUE = 0x10
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_FILESYSTEM = 0x100

FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000

INFO_FID = 1
INFO_DFID_NAME = 2
INFO_DFID = 3
INFO_OLD_DFID_NAME = 10
INFO_NEW_DFID_NAME = 12

_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO = struct.Struct("=BBH")  # info_type, pad, len
_HANDLE = struct.Struct("=Ii")  # handle_bytes, handle_type
_FSID = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.open_by_handle_at.restype = ctypes.c_int
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.name_to_handle_at.restype = ctypes.c_int
MAX_HANDLE_SZ = 128
AT_EMPTY_PATH = 0x1000


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def init(flags: int, event_f_flags: int = os.O_RDONLY) -> int:
    """``fanotify_init``: a new fanotify group fd."""
    return _check(_libc.fanotify_init(flags, event_f_flags), "fanotify_init")


def mark(fd: int, flags: int, mask: int, path: bytes, dirfd: int = -100) -> None:
    """``fanotify_mark`` (``dirfd`` -100 is AT_FDCWD)."""
    _check(_libc.fanotify_mark(fd, flags, mask, dirfd, path), "fanotify_mark")


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open an object from a ``struct file_handle`` (bytes as parsed from an event)."""
    return _check(_libc.open_by_handle_at(mount_fd, handle, flags | os.O_CLOEXEC),
                  "open_by_handle_at")


def name_to_handle_at(path: bytes, dirfd: int = -100, flags: int = 0) -> bytes:
    """The ``struct file_handle`` bytes of ``path`` (as events report them)."""
    buf = ctypes.create_string_buffer(_HANDLE.pack(MAX_HANDLE_SZ, 0) + b"\0" * MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(dirfd, path, buf, ctypes.byref(mount_id), flags),
           "name_to_handle_at")
    n, _ = _HANDLE.unpack_from(buf.raw)
    return buf.raw[:_HANDLE.size + n]


@dataclass(slots=True)
class Event:
    """One fanotify event with its info records; handles are ``struct file_handle`` bytes."""

    mask: int
    pid: int
    fid: bytes | None = None
    dfid: bytes | None = None
    name: bytes | None = None
    old_dfid: bytes | None = None
    old_name: bytes | None = None
    new_dfid: bytes | None = None
    new_name: bytes | None = None


def parse(buf: bytes) -> Iterator[Event]:
    """Decode a buffer returned by ``read`` on a FID-mode fanotify fd."""
    off = 0
    end = len(buf)
    meta_unpack = _META.unpack_from
    info_unpack = _INFO.unpack_from
    handle_unpack = _HANDLE.unpack_from
    while off + _META.size <= end:
        ev_len, _vers, _res, meta_len, mask, _fd, pid = meta_unpack(buf, off)
        if ev_len < _META.size:
            break
        ev = Event(mask, pid)
        p = off + meta_len
        ev_end = off + ev_len
        while p + _INFO.size <= ev_end:
            itype, _pad, ilen = info_unpack(buf, p)
            if ilen == 0:
                break
            h = p + _INFO.size + _FSID
            hbytes, _htype = handle_unpack(buf, h)
            hend = h + _HANDLE.size + hbytes
            handle = buf[h:hend]
            if itype == INFO_FID:
                ev.fid = handle
            elif itype in (INFO_DFID_NAME, INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME):
                nul = buf.find(b"\0", hend, p + ilen)
                name = buf[hend:nul if nul >= 0 else p + ilen]
                if itype == INFO_DFID_NAME:
                    ev.dfid, ev.name = handle, name
                elif itype == INFO_OLD_DFID_NAME:
                    ev.old_dfid, ev.old_name = handle, name
                else:
                    ev.new_dfid, ev.new_name = handle, name
            elif itype == INFO_DFID:
                ev.dfid = handle
            p += ilen
        yield ev
        off = ev_end
