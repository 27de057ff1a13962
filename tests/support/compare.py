"""Tree comparison helpers for georep tests.

Usage as a module::

    python -m tests.support.compare PRIMARY SECONDARY [--atime] [--no-root]

prints the differences and exits 1 if there are any.

API:

* ``compare_trees(primary, secondary, ...) -> list[str]``: human-readable
  differences between a primary and its replica (empty list = identical).
* ``snapshot_tree(root, ...) -> dict[bytes, Snap]`` and
  ``diff_snapshots(before, after, ...) -> list[str]``: assert a tree (the
  primary) did not change, ignoring georep's own xattrs and ctime.

Reads are done with O_NOATIME so that comparing does not change atimes.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import stat
import sys
from collections import defaultdict
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import NamedTuple

CHUNK = 1024 * 1024
GEOREP_XATTR_PREFIXES = (b"trusted.georep.", b"user.georep.")
SPARSE_SLACK_BLOCKS = 8

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}


def show(rel: bytes) -> str:
    """Printable, unambiguous rendering of a relative bytes path."""
    if not rel:
        return "<root>"
    out = []
    for c in rel.decode("utf-8", "surrogateescape"):
        if "\udc80" <= c <= "\udcff":
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c == "\\":
            out.append("\\\\")
        elif not c.isprintable():
            out.append(c.encode("unicode_escape").decode("ascii"))
        else:
            out.append(c)
    return "".join(out)


def _kind(st: os.stat_result) -> str:
    return _KINDS.get(stat.S_IFMT(st.st_mode), "unknown")


def _join(a: bytes, b: bytes) -> bytes:
    return a + b"/" + b if b else a


def _relj(a: bytes, b: bytes) -> bytes:
    return a + b"/" + b if a else b


def _open_noatime(path: bytes) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0)
    try:
        return os.open(path, flags)
    except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)


def _chunks(path: bytes) -> Generator[bytes, None, None]:
    fd = _open_noatime(path)
    try:
        while True:
            b = os.read(fd, CHUNK)
            if not b:
                return
            yield b
    finally:
        os.close(fd)


def xattrs(path: bytes) -> dict[bytes, bytes]:
    """All xattrs of ``path`` (not following symlinks) except georep's own."""
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return out
        raise
    for n in names:
        nb = os.fsencode(n)
        if nb.startswith(GEOREP_XATTR_PREFIXES):
            continue
        try:
            out[nb] = os.getxattr(path, nb, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return out


def _listdir(path: bytes, ignore: Iterable[bytes]) -> dict[bytes, os.stat_result]:
    ign = set(ignore)
    out: dict[bytes, os.stat_result] = {}
    with os.scandir(path) as it:
        for e in it:
            if e.name in ign:
                continue
            out[e.name] = e.stat(follow_symlinks=False)
    return out


def _has_holes(st: os.stat_result) -> bool:
    return st.st_blocks * 512 < st.st_size


def _seeks_holes(path: bytes) -> bool:
    """True when the kernel reports a hole before the end (SEEK_HOLE).

    The block count alone cannot tell: ext4 may keep an unwritten extent (reads as zeros,
    reported as a hole, still counted in st_blocks) where a hole was punched; the slack
    check on st_blocks above bounds the space that costs.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.lseek(fd, 0, os.SEEK_HOLE) < size
    finally:
        os.close(fd)


def _first_content_diff(a: bytes, b: bytes) -> int | None:
    """Offset of the first differing byte of two equal-size files, or None."""
    off = 0
    ia, ib = _chunks(a), _chunks(b)
    try:
        while True:
            ca, cb = next(ia, b""), next(ib, b"")
            # reads may be short: realign on the shorter chunk
            while ca and cb:
                n = min(len(ca), len(cb))
                if ca[:n] != cb[:n]:
                    for i in range(n):
                        if ca[i] != cb[i]:
                            return off + i
                off += n
                ca, cb = ca[n:], cb[n:]
                if not ca:
                    ca = next(ia, b"")
                if not cb:
                    cb = next(ib, b"")
            if ca or cb:
                return off
            return None
    finally:
        ia.close()
        ib.close()


def _compare_entry(
    rel: bytes,
    pa: bytes,
    sa: bytes,
    ps: os.stat_result,
    ss: os.stat_result,
    check_atime: bool,
    diffs: list[str],
) -> bool:
    """Compare one entry present on both sides. Returns True if the types match."""
    p = show(rel)
    pk, sk = _kind(ps), _kind(ss)
    if pk != sk:
        diffs.append(f"type differs: {p}: primary={pk} secondary={sk}")
        return False
    if pk != "symlink" and stat.S_IMODE(ps.st_mode) != stat.S_IMODE(ss.st_mode):
        diffs.append(
            f"mode differs: {p}: primary={stat.S_IMODE(ps.st_mode):04o} "
            f"secondary={stat.S_IMODE(ss.st_mode):04o}"
        )
    if ps.st_uid != ss.st_uid:
        diffs.append(f"uid differs: {p}: primary={ps.st_uid} secondary={ss.st_uid}")
    if ps.st_gid != ss.st_gid:
        diffs.append(f"gid differs: {p}: primary={ps.st_gid} secondary={ss.st_gid}")
    if ps.st_mtime_ns != ss.st_mtime_ns:
        diffs.append(f"mtime differs: {p}: primary={ps.st_mtime_ns} secondary={ss.st_mtime_ns}")
    if check_atime and pk == "file" and ps.st_atime_ns != ss.st_atime_ns:
        diffs.append(f"atime differs: {p}: primary={ps.st_atime_ns} secondary={ss.st_atime_ns}")
    if pk in ("chardev", "blockdev") and ps.st_rdev != ss.st_rdev:
        diffs.append(
            f"rdev differs: {p}: primary={os.major(ps.st_rdev)},{os.minor(ps.st_rdev)} "
            f"secondary={os.major(ss.st_rdev)},{os.minor(ss.st_rdev)}"
        )
    if pk == "symlink":
        pt, st_ = os.readlink(pa), os.readlink(sa)
        if pt != st_:
            diffs.append(f"symlink target differs: {p}: primary={pt!r} secondary={st_!r}")
    if pk == "file":
        if ps.st_size != ss.st_size:
            diffs.append(f"size differs: {p}: primary={ps.st_size} secondary={ss.st_size}")
        else:
            off = _first_content_diff(pa, sa)
            if off is not None:
                diffs.append(f"content differs: {p}: first difference at byte {off}")
            if ss.st_blocks > ps.st_blocks + SPARSE_SLACK_BLOCKS:
                diffs.append(
                    f"sparseness lost: {p}: secondary uses {ss.st_blocks} blocks, "
                    f"primary {ps.st_blocks}"
                )
            elif _has_holes(ps) and _seeks_holes(pa) and not _seeks_holes(sa):
                diffs.append(f"sparseness lost: {p}: primary has holes, secondary has none")
    px, sx = xattrs(pa), xattrs(sa)
    if px != sx:
        for name in sorted(set(px) | set(sx)):
            if name not in sx:
                diffs.append(f"xattr missing in secondary: {p}: {name!r}")
            elif name not in px:
                diffs.append(f"xattr extra in secondary: {p}: {name!r}")
            elif px[name] != sx[name]:
                diffs.append(
                    f"xattr value differs: {p}: {name!r}: primary={px[name][:64]!r} "
                    f"secondary={sx[name][:64]!r}"
                )
    return True


def _groups(keys: dict[bytes, tuple[int, int]], paths: set[bytes]) -> set[frozenset[bytes]]:
    by_ino: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    for rel in paths:
        k = keys.get(rel)
        if k is not None:
            by_ino[k].append(rel)
    return {frozenset(v) for v in by_ino.values() if len(v) > 1}


def compare_trees(
    primary: Path | str | bytes,
    secondary: Path | str | bytes,
    *,
    ignore_root_names: Iterable[bytes] = (b".georep",),
    check_atime: bool = False,
    check_root: bool = True,
) -> list[str]:
    """Differences between ``primary`` and ``secondary`` (empty list = identical).

    Compares, per relative path: presence, type, mode (not for symlinks), uid/gid,
    mtime_ns (symlinks included), atime_ns of regular files if ``check_atime``,
    st_rdev of devices, symlink targets, file sizes and bytes (chunked), xattrs
    (including POSIX ACLs, excluding trusted.georep.* / user.georep.*),
    sparseness (secondary st_blocks <= primary + 8, holes kept if the primary has
    holes) and hardlink groups (partition of regular files by inode; st_nlink is
    not compared since the secondary has extra links in its gfid index).
    ``ignore_root_names`` are skipped in the top directory of both trees. The
    root directory's own attributes are compared if ``check_root``.
    """
    proot = os.path.abspath(os.fsencode(primary))
    sroot = os.path.abspath(os.fsencode(secondary))
    ignore = tuple(ignore_root_names)
    diffs: list[str] = []
    pkeys: dict[bytes, tuple[int, int]] = {}
    skeys: dict[bytes, tuple[int, int]] = {}
    common_files: set[bytes] = set()
    if check_root:
        _compare_entry(b"", proot, sroot, os.lstat(proot), os.lstat(sroot), check_atime, diffs)
    stack: list[bytes] = [b""]
    while stack:
        rel = stack.pop()
        pd, sd = _join(proot, rel), _join(sroot, rel)
        ign = ignore if rel == b"" else ()
        pents, sents = _listdir(pd, ign), _listdir(sd, ign)
        subdirs: list[bytes] = []
        for name in sorted(pents.keys() | sents.keys()):
            child = _relj(rel, name)
            ps, ss = pents.get(name), sents.get(name)
            if ss is None:
                diffs.append(f"missing in secondary: {show(child)} ({_kind(ps)})")  # type: ignore[arg-type]
                continue
            if ps is None:
                diffs.append(f"extra in secondary: {show(child)} ({_kind(ss)})")
                continue
            if not _compare_entry(
                child, _join(pd, name), _join(sd, name), ps, ss, check_atime, diffs
            ):
                continue
            if stat.S_ISDIR(ps.st_mode):
                subdirs.append(child)
            elif stat.S_ISREG(ps.st_mode):
                common_files.add(child)
                if ps.st_nlink > 1:
                    pkeys[child] = (ps.st_dev, ps.st_ino)
                if ss.st_nlink > 1:
                    skeys[child] = (ss.st_dev, ss.st_ino)
        stack.extend(reversed(subdirs))
    pg, sg = _groups(pkeys, common_files), _groups(skeys, common_files)
    for g in sorted(pg - sg, key=sorted):
        diffs.append(
            "hardlink group not kept in secondary: " + ", ".join(show(x) for x in sorted(g))
        )
    for g in sorted(sg - pg, key=sorted):
        diffs.append("hardlink group only in secondary: " + ", ".join(show(x) for x in sorted(g)))
    return diffs


class Snap(NamedTuple):
    kind: str
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int | None  # regular files and symlinks only
    mtime_ns: int
    atime_ns: int | None  # regular files only
    rdev: int | None
    target: bytes | None
    digest: str | None  # blake2b of the content of regular files
    xattrs: tuple[tuple[bytes, bytes], ...]
    links: tuple[bytes, ...]  # other paths of the same inode (regular files)
    ino: int


def _digest(path: bytes) -> str:
    h = hashlib.blake2b(digest_size=20)
    for c in _chunks(path):
        h.update(c)
    return h.hexdigest()


def snapshot_tree(
    root: Path | str | bytes,
    *,
    ignore_root_names: Iterable[bytes] = (b".georep",),
    include_root: bool = True,
) -> dict[bytes, Snap]:
    """Map relative path -> Snap for every entry (the root is b"" if included).

    Excludes georep's own xattrs; ctime is not recorded; atime only for regular
    files (georep must read with O_NOATIME). Content is read with O_NOATIME.
    """
    r = os.path.abspath(os.fsencode(root))
    ignore = tuple(ignore_root_names)
    raw: dict[bytes, tuple[os.stat_result, bytes | None, str | None, dict[bytes, bytes]]] = {}

    def record(rel: bytes, path: bytes, st: os.stat_result) -> None:
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        digest = _digest(path) if stat.S_ISREG(st.st_mode) else None
        raw[rel] = (st, target, digest, xattrs(path))

    if include_root:
        record(b"", r, os.lstat(r))
    stack = [b""]
    while stack:
        rel = stack.pop()
        d = _join(r, rel)
        ents = _listdir(d, ignore if rel == b"" else ())
        for name in sorted(ents):
            child = _relj(rel, name)
            st = ents[name]
            record(child, _join(d, name), st)
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)
    by_ino: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    for rel, (st, _, _, _) in raw.items():
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            by_ino[(st.st_dev, st.st_ino)].append(rel)
    out: dict[bytes, Snap] = {}
    for rel, (st, target, digest, xa) in raw.items():
        k = _kind(st)
        links: tuple[bytes, ...] = ()
        if k == "file" and st.st_nlink > 1:
            links = tuple(sorted(x for x in by_ino[(st.st_dev, st.st_ino)] if x != rel))
        out[rel] = Snap(
            kind=k,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            nlink=st.st_nlink if k != "dir" else 0,
            size=st.st_size if k in ("file", "symlink") else None,
            mtime_ns=st.st_mtime_ns,
            atime_ns=st.st_atime_ns if k == "file" else None,
            rdev=st.st_rdev if k in ("chardev", "blockdev") else None,
            target=target,
            digest=digest,
            xattrs=tuple(sorted(xa.items())),
            links=links,
            ino=st.st_ino,
        )
    return out


def diff_snapshots(
    before: dict[bytes, Snap],
    after: dict[bytes, Snap],
    *,
    ignore_fields: Iterable[str] = (),
) -> list[str]:
    """Differences between two snapshots; ``ignore_fields`` names Snap fields to skip
    (e.g. ("ino",) when comparing two separately generated trees)."""
    ign = set(ignore_fields)
    bad = ign - set(Snap._fields)
    if bad:
        raise ValueError(f"unknown Snap fields: {sorted(bad)}")
    diffs: list[str] = []
    for rel in sorted(before.keys() | after.keys()):
        b, a = before.get(rel), after.get(rel)
        if a is None:
            diffs.append(f"disappeared: {show(rel)}")
            continue
        if b is None:
            diffs.append(f"appeared: {show(rel)} ({a.kind})")
            continue
        for field in Snap._fields:
            if field in ign:
                continue
            vb, va = getattr(b, field), getattr(a, field)
            if vb != va:
                if field == "mode":
                    vb, va = f"{vb:04o}", f"{va:04o}"
                diffs.append(f"{field} changed: {show(rel)}: before={vb!r} after={va!r}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="compare a georep primary and secondary tree")
    ap.add_argument("primary")
    ap.add_argument("secondary")
    ap.add_argument("--atime", action="store_true", help="also compare atimes of files")
    ap.add_argument("--no-root", action="store_true", help="skip the root dir's attributes")
    ap.add_argument(
        "--ignore",
        action="append",
        default=None,
        help="top-level name to ignore (default .georep; repeatable)",
    )
    ns = ap.parse_args(argv)
    ignore = tuple(os.fsencode(x) for x in ns.ignore) if ns.ignore else (b".georep",)
    diffs = compare_trees(
        Path(ns.primary),
        Path(ns.secondary),
        ignore_root_names=ignore,
        check_atime=ns.atime,
        check_root=not ns.no_root,
    )
    for d in diffs:
        print(d)
    if diffs:
        print(f"{len(diffs)} difference(s)", file=sys.stderr)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
