"""Open paths beneath a directory fd without ever following a symlink.

``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` makes the
kernel refuse any path that leaves the starting directory or crosses a symlink, in
one syscall however deep the path is.  On kernels without openat2 (before 5.6) we
walk component by component with ``O_NOFOLLOW``, which the kernel enforces too.
"""

from __future__ import annotations

import ctypes
import errno
import os

_SYS_OPENAT2 = 437  # same number on x86_64 and aarch64 (generic syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_have_openat2: bool | None = None


def _creates(flags: int) -> bool:
    # O_TMPFILE contains the O_DIRECTORY bit, so test it as a whole.
    return bool(flags & os.O_CREAT) or (flags & os.O_TMPFILE) == os.O_TMPFILE


def _openat2(dir_fd: int, path: bytes, flags: int, mode: int) -> int:
    # openat2 rejects a non-zero mode unless the call may create the file.
    how = _OpenHow(flags | os.O_CLOEXEC, mode if _creates(flags) else 0,
                   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(path),
                  ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return int(fd)


def _walk(dir_fd: int, path: bytes, flags: int, mode: int) -> int:
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if any(p == b".." for p in parts):
        raise OSError(errno.EXDEV, "path leaves its directory", path)
    if not parts:
        return os.open(b".", flags | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    cur = dir_fd
    try:
        for p in parts[:-1]:
            nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=cur)
            if cur != dir_fd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
    finally:
        if cur != dir_fd:
            os.close(cur)


def open_beneath(dir_fd: int, path: bytes, flags: int, mode: int = 0o600) -> int:
    """Open ``path`` relative to ``dir_fd``; fails (ELOOP/EXDEV) on any symlink or escape."""
    global _have_openat2
    if not path:
        path = b"."
    if _have_openat2 is not False:
        try:
            return _openat2(dir_fd, path, flags, mode)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _have_openat2 = False
    return _walk(dir_fd, path, flags, mode)
