"""The one place that touches extended attributes.

We use ``os.getxattr/setxattr/listxattr(..., follow_symlinks=False)`` rather than the
``xattr`` package: ``xattr.listxattr`` decodes names strictly as UTF-8 (it fails on a
non-UTF-8 attribute name), its ``getxattr`` makes two syscalls, and with an fd plus
``symlink=True`` it reports a stale errno.  The os calls take ``bytes`` names, make one
syscall and are about twice as fast.  Keeping the choice here means changing it is one edit.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Mapping

from fsops.constants import OWN_XATTR_PREFIXES

PathLike = int | bytes

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
_SYSTEM_KEPT = frozenset({ACL_ACCESS, ACL_DEFAULT})

_MISSING = (errno.ENODATA, errno.ENOTSUP)
_OWN_STR = tuple(os.fsdecode(p) for p in OWN_XATTR_PREFIXES)

#: Which replicated xattrs a session manages (config keys sync-xattrs and sync-acls):
#: everything, plain xattrs only (user, trusted, security; no POSIX ACLs), POSIX ACLs
#: only, or nothing.  Both ends use the same scope: the primary reads and digests only
#: those, the secondary compares, removes and sets only those, and leaves the rest alone.
ALL, NO_ACLS, ACLS_ONLY, NONE = "all", "xattrs", "acls", "none"
SCOPES = (ALL, NO_ACLS, ACLS_ONLY, NONE)


def scope_of(sync_xattrs: bool, sync_acls: bool) -> str:
    """The scope for the two config keys."""
    if sync_xattrs:
        return ALL if sync_acls else NO_ACLS
    return ACLS_ONLY if sync_acls else NONE


def replicated(name: bytes, scope: str = ALL) -> bool:
    """True for xattrs that replication carries (not georep's own, only ACLs of system.*)
    and that ``scope`` manages."""
    if name.startswith(OWN_XATTR_PREFIXES):
        return False
    acl = name in _SYSTEM_KEPT
    if name.startswith(b"system.") and not acl:
        return False
    if scope == ALL:
        return True
    return scope == (ACLS_ONLY if acl else NO_ACLS)


def get(target: PathLike, name: bytes, *, dir_fd: int | None = None) -> bytes | None:
    """Value of one xattr, or None when absent. ``target`` is an fd or a name under ``dir_fd``."""
    try:
        if isinstance(target, int):
            return os.getxattr(target, name)
        if dir_fd is not None:
            return os.getxattr(_proc_path(dir_fd, target), name, follow_symlinks=False)
        return os.getxattr(target, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in _MISSING:
            return None
        raise


def set(target: PathLike, name: bytes, value: bytes, *, flags: int = 0,
        dir_fd: int | None = None) -> None:
    """Set one xattr (``flags``: ``os.XATTR_CREATE`` / ``os.XATTR_REPLACE``)."""
    if isinstance(target, int):
        os.setxattr(target, name, value, flags)
    elif dir_fd is not None:
        os.setxattr(_proc_path(dir_fd, target), name, value, flags, follow_symlinks=False)
    else:
        os.setxattr(target, name, value, flags, follow_symlinks=False)


def remove(target: PathLike, name: bytes, *, dir_fd: int | None = None) -> None:
    """Remove one xattr; absent is not an error."""
    try:
        if isinstance(target, int):
            os.removexattr(target, name)
        elif dir_fd is not None:
            os.removexattr(_proc_path(dir_fd, target), name, follow_symlinks=False)
        else:
            os.removexattr(target, name, follow_symlinks=False)
    except OSError as e:
        if e.errno not in _MISSING:
            raise


def names(target: PathLike, *, dir_fd: int | None = None) -> list[bytes]:
    """All xattr names, as bytes (never decoded)."""
    # os.listxattr returns str decoded with the filesystem encoding (surrogateescape):
    # re-encoding gives back the exact bytes, non-UTF-8 names included.
    return [os.fsencode(n) for n in _raw_names(target, dir_fd)]


def _raw_names(target: PathLike, dir_fd: int | None) -> list[str]:
    try:
        if isinstance(target, int):
            raw = os.listxattr(target)
        elif dir_fd is not None:
            raw = os.listxattr(_proc_path(dir_fd, target), follow_symlinks=False)
        else:
            raw = os.listxattr(target, follow_symlinks=False)
    except OSError as e:
        if e.errno in _MISSING:
            return []
        raise
    return raw


def read_replicated(target: PathLike, *, dir_fd: int | None = None,
                    scope: str = ALL) -> dict[bytes, bytes]:
    """Every xattr that replication carries (user, trusted, security, POSIX ACLs) within
    ``scope`` (NONE: no syscall at all)."""
    out: dict[bytes, bytes] = {}
    if scope == NONE:
        return out
    for raw in _raw_names(target, dir_fd):
        if raw.startswith(_OWN_STR):
            continue  # georep's own (the gfid of every object): skipped before encoding
        n = os.fsencode(raw)
        if replicated(n, scope):
            v = get(target, n, dir_fd=dir_fd)
            if v is not None:
                out[n] = v
    return out


def digest(attrs: Mapping[bytes, bytes]) -> bytes:
    """Order-independent 8-byte digest of an xattr set; equal sets give equal digests."""
    if not attrs:
        return b""
    h = hashlib.blake2b(digest_size=8)
    for n in sorted(attrs):
        v = attrs[n]
        h.update(len(n).to_bytes(2, "little"))
        h.update(n)
        h.update(len(v).to_bytes(4, "little"))
        h.update(v)
    return h.digest()


def apply(target: PathLike, wanted: Mapping[bytes, bytes], *, dir_fd: int | None = None,
          scope: str = ALL) -> None:
    """Make the replicated xattrs of ``target`` within ``scope`` exactly ``wanted``;
    georep's own, and those outside the scope, are untouched."""
    if scope == NONE:
        return
    current = read_replicated(target, dir_fd=dir_fd, scope=scope)
    for n in current:
        if n not in wanted:
            remove(target, n, dir_fd=dir_fd)
    for n, v in wanted.items():
        if current.get(n) != v and replicated(n, scope):
            set(target, n, v, dir_fd=dir_fd)


def _proc_path(dir_fd: int, name: bytes) -> bytes:
    # The os xattr calls have no dir_fd parameter.  /proc/self/fd/N resolves to the open
    # directory itself (a kernel-held reference, not a re-walk of its path), so
    # "<that>/name" with follow_symlinks=False names exactly the entry in that directory.
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)
