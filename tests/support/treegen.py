"""Seeded, deterministic generator of a hostile sample tree for georep tests.

Usage as a module::

    python -m tests.support.treegen DIR --seed N --entries N [--small]

API:

* ``make_tree(root, *, seed=1, entries=20_000, big_sparse=True, big_files_mib=4,
  big_dir_files=5000, data_mib=0) -> dict`` builds the tree and returns a summary
  (counts by type and feature, total bytes). ``data_mib`` tops the tree's written
  data up to that many MiB with files of 64 KiB to 48 MiB under ``media/`` (the
  entry count stays the same: the bulk part gets fewer entries).
* ``apply_changes(root, *, seed=2) -> dict`` applies the acceptance-test change
  mix to a tree made by ``make_tree`` and describes what it did (paths are
  bytes, relative to ``root``).

All names are handled as bytes. The content depends only on the seed and the
parameters, except the one absolute in-tree symlink whose target contains the
root path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import stat
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

KIB = 1024
MIB = 1024 * KIB

BIG_DIR = b"big5k"
BIG_DIR_RENAMED = b"moved/big5k.renamed"
BIG16 = b"large/big16.bin"
SPARSE_BIG = b"sparse/sparse256.bin"
SPARSE_SMALL = b"sparse/small_sparse.bin"
DEEP_LEVELS = 40
WIDE_ENTRIES = 520

# Odd names (all bytes). Includes non-UTF-8, control characters, glob chars,
# NFC/NFD and case near-collisions.
ODD_NAMES: tuple[bytes, ...] = (
    b"with space",
    b" leading space",
    b"trailing space ",
    b"new\nline",
    b"tab\there",
    b"carriage\rreturn",
    b"-leading-dash",
    b"--double-dash",
    "unicode-\u00e9\u00f1-\u65e5\u672c\u8a9e".encode(),
    "emoji-\U0001f389\U0001f680".encode(),
    b"quote'single",
    b'quote"double',
    b"back\\slash",
    b"glob*?[x",
    b"[bracket]",
    b"\xff\xfe-latin1-\xe9",
    b"latin1-\xe9t\xe9",
    b".hidden",
    b"..dots",
    b"...",
    b"~tilde",
    b"$dollar",
    b"semi;colon",
    b"e\xcc\x81-nfd",  # e + combining acute
    b"\xc3\xa9-nfd",  # precomposed e-acute (NFC of the previous, different bytes)
    b"CaseName",
    b"casename",
    b"n255-" + b"x" * 250,  # exactly 255 bytes
    "\u00e9".encode() * 127 + b"z",  # 255 bytes of multibyte UTF-8
)
NON_UTF8_DIR = b"\xff\xfe-dir-\x80\x81"
ODD_DIR = b"dir with\nnewline 'and' \"quotes\""
NAME255_DIR = b"d255-" + b"y" * 250


def _is_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _join(*parts: bytes) -> bytes:
    return b"/".join(p for p in parts if p)


class _Gen:
    def __init__(self, root: Path, seed: int, big_dir_files: int) -> None:
        self.root = os.path.abspath(os.fsencode(root))
        self.rng = random.Random(seed)
        self.is_root = os.geteuid() == 0
        # 4 MiB pool of seeded random bytes; file contents are slices of it.
        self.pool = self.rng.randbytes(4 * MIB)
        self.big_dir_files = big_dir_files
        self.entries: list[bytes] = []  # relative paths, creation order
        self.kind: dict[bytes, str] = {}
        self.modes: dict[bytes, int] = {}
        self.summary: dict[str, int] = {
            "entries": 0,
            "dirs": 0,
            "files": 0,
            "empty_files": 0,
            "symlinks": 0,
            "symlinks_relative": 0,
            "symlinks_absolute_inside": 0,
            "symlinks_absolute_outside": 0,
            "symlinks_dangling": 0,
            "fifos": 0,
            "chardevs": 0,
            "bytes": 0,
            "big_files": 0,
            "media_files": 0,
            "data_bytes": 0,
            "sparse_files": 0,
            "hardlink_groups": 0,
            "hardlink_pairs": 0,
            "hardlink_triples": 0,
            "hardlink_cross_dir_groups": 0,
            "odd_names": 0,
            "non_utf8_names": 0,
            "names_255": 0,
            "max_depth": 0,
            "dirs_500plus": 0,
            "big_dir_files": 0,
            "setuid": 0,
            "setgid": 0,
            "sticky_dirs": 0,
            "xattr_entries": 0,
            "xattr_binary_values": 0,
            "acl_entries": 0,
            "default_acl_dirs": 0,
            "non_root_owned": 0,
            "pre_1970_mtimes": 0,
            "future_mtimes": 0,
        }

    # -- helpers -----------------------------------------------------------
    def abs(self, rel: bytes) -> bytes:
        return _join(self.root, rel)

    def _note(self, rel: bytes, kind: str) -> None:
        self.entries.append(rel)
        self.kind[rel] = kind
        s = self.summary
        s["entries"] += 1
        name = rel.rsplit(b"/", 1)[-1]
        if not _is_utf8(name):
            s["non_utf8_names"] += 1
        if len(name) == 255:
            s["names_255"] += 1
        s["max_depth"] = max(s["max_depth"], rel.count(b"/") + 1)

    def content(self, size: int) -> bytes:
        if size <= 0:
            return b""
        out = []
        while size > 0:
            n = min(size, len(self.pool) // 2)
            off = self.rng.randrange(0, len(self.pool) - n + 1)
            out.append(self.pool[off : off + n])
            size -= n
        return b"".join(out)

    def small_size(self) -> int:
        r = self.rng.random()
        if r < 0.08:
            return 0
        # log-uniform in [0, 64 KiB]: mostly small, some up to 64 KiB
        return int(math.exp(self.rng.uniform(0.0, math.log(64 * KIB + 1)))) - 1

    def mkdir(self, rel: bytes, mode: int = 0o755) -> bytes:
        os.mkdir(self.abs(rel), 0o700)
        self._note(rel, "dir")
        self.modes[rel] = mode
        self.summary["dirs"] += 1
        return rel

    def file(self, rel: bytes, size: int | None = None, mode: int | None = None) -> bytes:
        if size is None:
            size = self.small_size()
        data = self.content(size)
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self._note(rel, "file")
        self.modes[rel] = (
            mode if mode is not None else self.rng.choice((0o600, 0o640, 0o644, 0o664, 0o644))
        )
        self.summary["files"] += 1
        self.summary["bytes"] += size
        self.summary["data_bytes"] += size
        if size == 0:
            self.summary["empty_files"] += 1
        return rel

    def big_file(self, rel: bytes, size: int) -> bytes:
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            left = size
            while left > 0:
                n = min(left, MIB)
                os.write(fd, self.content(n))
                left -= n
        finally:
            os.close(fd)
        self._note(rel, "file")
        self.modes[rel] = 0o644
        self.summary["files"] += 1
        self.summary["big_files"] += 1
        self.summary["bytes"] += size
        self.summary["data_bytes"] += size
        return rel

    def sparse_file(self, rel: bytes, size: int, extents: list[tuple[int, int]]) -> bytes:
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            for off, n in extents:
                os.pwrite(fd, self.content(n), off)
        finally:
            os.close(fd)
        self._note(rel, "file")
        self.modes[rel] = 0o644
        self.summary["files"] += 1
        self.summary["sparse_files"] += 1
        self.summary["bytes"] += size
        self.summary["data_bytes"] += sum(n for _, n in extents)
        return rel

    def symlink(self, rel: bytes, target: bytes, kind: str | None = None) -> bytes:
        os.symlink(target, self.abs(rel))
        self._note(rel, "symlink")
        self.summary["symlinks"] += 1
        if kind:
            self.summary["symlinks_" + kind] += 1
        return rel

    def hardlinks(self, src: bytes, others: list[bytes]) -> None:
        for o in others:
            os.link(self.abs(src), self.abs(o))
            self._note(o, "hardlink")
        s = self.summary
        s["hardlink_groups"] += 1
        if len(others) == 1:
            s["hardlink_pairs"] += 1
        elif len(others) == 2:
            s["hardlink_triples"] += 1
        dirs = {p.rsplit(b"/", 1)[0] if b"/" in p else b"" for p in [src, *others]}
        if len(dirs) > 1:
            s["hardlink_cross_dir_groups"] += 1

    # -- sections ------------------------------------------------------------
    def build_fixed(self, big_sparse: bool, big_files_mib: int) -> None:
        rng = self.rng
        # big directory (renamed by apply_changes)
        self.mkdir(BIG_DIR)
        for i in range(self.big_dir_files):
            self.file(_join(BIG_DIR, b"f%05d" % i), size=rng.randrange(0, 1025))
        self.summary["big_dir_files"] = self.big_dir_files
        if self.big_dir_files >= 500:
            self.summary["dirs_500plus"] += 1
        self.mkdir(b"moved")

        # a wide directory with 500+ entries (files, a few dirs and symlinks)
        self.mkdir(b"wide")
        for i in range(WIDE_ENTRIES):
            rel = _join(b"wide", b"w%04d" % i)
            if i % 97 == 0:
                self.mkdir(rel)
            elif i % 89 == 0:
                self.symlink(rel, b"w%04d" % (i - 1), "relative")
            else:
                self.file(rel, size=rng.randrange(0, 2049))
        self.summary["dirs_500plus"] += 1

        # odd names
        self.mkdir(b"odd")
        for name in ODD_NAMES:
            self.file(_join(b"odd", name))
            self.summary["odd_names"] += 1
        for d in (NON_UTF8_DIR, ODD_DIR, NAME255_DIR):
            self.mkdir(_join(b"odd", d))
            self.summary["odd_names"] += 1
            for name in (b"inner", b"\xe9\xe8-inner", b"-x y\n"):
                self.file(_join(b"odd", d, name))
        self.symlink(
            _join(b"odd", b"link-\xff-non-utf8-target"), b"\xff\xfe-latin1-\xe9", "relative"
        )
        self.symlink(_join(b"odd", b"link with\nnewline"), b"new\nline", "relative")

        # 40-level-deep path
        rel = b"deep"
        self.mkdir(rel)
        for lvl in range(1, DEEP_LEVELS + 1):
            rel = _join(rel, (b"level-%02d-" % lvl).ljust(40, b"p"))
            self.mkdir(rel)
        self.file(_join(rel, b"bottom.txt"), size=100)
        self.file(_join(rel, b"n255-" + b"b" * 250), size=10)
        self.symlink(_join(rel, b"up-to-top"), b"../" * DEEP_LEVELS + b"odd/with space", "relative")
        deep_bottom = rel

        # big files
        self.mkdir(b"large")
        for i in range(1, 4):
            self.big_file(_join(b"large", b"big%d.bin" % i), big_files_mib * MIB)
        self.big_file(BIG16, 16 * MIB)

        # sparse files
        self.mkdir(b"sparse")
        self.sparse_file(SPARSE_SMALL, 8 * MIB, [(0, 64 * KIB), (3 * MIB, 64 * KIB)])
        if big_sparse:
            self.sparse_file(
                SPARSE_BIG, 256 * MIB, [(8 * MIB, MIB), (100 * MIB, MIB), (200 * MIB, MIB)]
            )

        # hardlinks and symlinks
        self.mkdir(b"links")
        self.mkdir(b"links/sub")
        self.file(b"links/pair_a", size=3000)
        self.hardlinks(b"links/pair_a", [b"links/pair_b"])
        self.file(b"links/cross_a", size=5000)
        self.hardlinks(b"links/cross_a", [b"links/sub/cross_b"])
        self.file(b"links/tri1", size=7000)
        self.hardlinks(b"links/tri1", [b"odd/tri2 \xff", _join(deep_bottom, b"tri3")])
        self.file(b"links/empty_pair_a", size=0)
        self.hardlinks(b"links/empty_pair_a", [b"wide/empty_pair_b"])
        self.symlink(b"links/rel", b"../odd/with space", "relative")
        self.symlink(b"links/rel_dir", b"../deep", "relative")
        self.symlink(b"links/abs_inside", _join(self.root, b"large/big1.bin"), "absolute_inside")
        self.symlink(b"links/abs_etc", b"/etc/hostname", "absolute_outside")
        self.symlink(b"links/abs_etc_dir", b"/etc", "absolute_outside")
        self.symlink(b"links/dangling", b"does/not/exist", "dangling")
        self.symlink(b"links/dangling_abs", b"/nonexistent/georep/target", "dangling")
        self.symlink(b"links/loop1", b"loop2", "dangling")
        self.symlink(b"links/loop2", b"loop1", "dangling")

        # specials
        self.mkdir(b"special")
        os.mkfifo(self.abs(b"special/fifo"), 0o600)
        self._note(b"special/fifo", "fifo")
        self.modes[b"special/fifo"] = 0o640
        self.summary["fifos"] += 1
        if self.is_root:
            os.mknod(self.abs(b"special/null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
            self._note(b"special/null", "chardev")
            self.modes[b"special/null"] = 0o666
            self.summary["chardevs"] += 1

        # modes
        self.mkdir(b"modes")
        for m in (0o600, 0o640, 0o644, 0o664, 0o700, 0o750, 0o755, 0o444):
            self.file(_join(b"modes", b"m%04o" % m), size=64, mode=m)
        self.file(b"modes/setuid", size=64, mode=0o4755)
        self.file(b"modes/setgid", size=64, mode=0o2755)
        self.summary["setuid"] += 1
        self.summary["setgid"] += 1
        self.mkdir(b"modes/setgid_dir", mode=0o2755)
        self.file(b"modes/setgid_dir/inner")
        self.summary["setgid"] += 1
        self.mkdir(b"modes/sticky", mode=0o1777)
        self.file(b"modes/sticky/inner")
        self.summary["sticky_dirs"] += 1
        self.mkdir(b"modes/private", mode=0o700)
        self.file(b"modes/private/inner", mode=0o600)

        # ACLs: default ACL on a dir (set before children are created, so they inherit)
        self.mkdir(b"acl")
        self._setfacl(["-d", "-m", "u:1002:rwx,g:1003:r-x"], b"acl")
        self.summary["default_acl_dirs"] += 1
        self.file(b"acl/inherited")
        self.mkdir(b"acl/inherited_dir")
        self.file(b"acl/explicit", size=100)
        self.file(b"acl/mask_only", size=100)

        # material for apply_changes
        self.mkdir(b"chg")
        self.file(b"chg/swap_a", size=1111)
        self.file(b"chg/swap_b", size=2222)
        self.file(b"chg/file2dir", size=300)
        self.mkdir(b"chg/dir2file")
        self.file(b"chg/dir2file/inner1")
        self.mkdir(b"chg/dir2file/sub")
        self.file(b"chg/dir2file/sub/inner2")
        self.mkdir(b"chg/delsub")
        for i in range(3):
            d = self.mkdir(_join(b"chg/delsub", b"d%d" % i))
            for j in range(5):
                self.file(_join(d, b"f%d" % j))
        self.symlink(b"chg/delsub/d0/lnk", b"../d1/f0", "relative")
        self.file(b"chg/trunc.bin", size=200 * KIB)
        self.file(b"chg/append.bin", size=50 * KIB)
        self.file(b"chg/chmod_me", size=10, mode=0o644)
        self.mkdir(b"chg/chmod_dir", mode=0o755)
        self.file(b"chg/chown_me", size=10)
        self.file(b"chg/hl_src", size=4000)
        self.mkdir(b"chg/sym2dir_target")
        self.symlink(b"chg/sym2dir", b"sym2dir_target", "relative")

    def _setfacl(self, args: list[str], rel: bytes) -> None:
        subprocess.run(["setfacl", *args, "--", self.abs(rel)], check=True)

    def build_media(self, target_bytes: int) -> None:
        """Files of 64 KiB to 48 MiB (log-uniform) until the tree holds ``target_bytes``
        of data, ten to a directory under ``media/``."""
        rng = self.rng
        if self.summary["data_bytes"] >= target_bytes:
            return
        base = self.mkdir(b"media")
        d = base
        i = 0
        while self.summary["data_bytes"] < target_bytes:
            if i % 10 == 0:
                d = self.mkdir(_join(base, b"m%03d" % (i // 10)))
            size = int(math.exp(rng.uniform(math.log(64 * KIB), math.log(48 * MIB))))
            size = min(size, target_bytes - self.summary["data_bytes"])
            if size >= MIB:
                self.big_file(_join(d, b"v%04d.bin" % i), size)
            else:
                self.file(_join(d, b"v%04d.bin" % i), size=size)
            self.summary["media_files"] += 1
            i += 1

    def build_bulk(self, budget: int) -> None:
        rng = self.rng
        base = self.mkdir(b"bulk")
        tops = 0
        queue: deque[tuple[bytes, int]] = deque()
        n = 0
        while budget > 0:
            if not queue:
                queue.append((self.mkdir(_join(base, b"t%03d" % tops)), 1))
                tops += 1
                budget -= 1
                continue
            d, depth = queue.popleft()
            fan = int(math.exp(rng.uniform(0.0, math.log(300))))
            nsub = 0 if depth >= 8 else rng.randint(0, min(6, fan // 3 + 1))
            for i in range(fan):
                if budget <= 0:
                    break
                n += 1
                if i < nsub:
                    queue.append(
                        (
                            self.mkdir(
                                _join(d, b"d%d" % n),
                                rng.choice((0o755, 0o755, 0o750, 0o700, 0o775)),
                            ),
                            depth + 1,
                        )
                    )
                elif rng.random() < 0.01:
                    up = b"../" * (d.count(b"/") + 1)
                    self.symlink(_join(d, b"s%d" % n), up + b"odd/with space", "relative")
                else:
                    name = b"f%d" % n
                    if rng.random() < 0.02:
                        name += rng.choice((b" sp", b"-\xe9", b"\n", b"*"))
                    self.file(_join(d, name))
                budget -= 1

    def apply_metadata(self) -> None:
        rng = self.rng
        s = self.summary
        # 1. owners (before chmod: chown clears setuid/setgid)
        if self.is_root:
            for rel in self.entries:
                if rel.startswith(b"special/") or rng.random() < 0.3 or rel.startswith(b"modes/"):
                    uid, gid = rng.randint(1000, 1010), rng.randint(1000, 1010)
                    os.chown(self.abs(rel), uid, gid, follow_symlinks=False)
                    s["non_root_owned"] += 1
        # 2. modes
        for rel, mode in self.modes.items():
            os.chmod(self.abs(rel), mode)
        # 3. xattrs
        fixed_x = {
            b"modes/m0644": [(b"user.comment", b"hello world")],
            b"odd/with space": [(b"user.binary", bytes(range(256)) + b"\x00\x00")],
            b"odd": [(b"user.dirattr", b"on a directory")],
            b"large/big1.bin": [("user.\u00fcn\u00ef-c\u00f6de".encode(), b"\xff\x00\xfe")],
            b"links/pair_a": [(b"user.empty", b""), (b"user.big", self.content(2000))],
            b"chg/chmod_me": [(b"user.x", b"1")],
        }
        for rel, pairs in fixed_x.items():
            for name, value in pairs:
                os.setxattr(self.abs(rel), name, value, follow_symlinks=False)
                if b"\x00" in value or b"\xff" in value:
                    s["xattr_binary_values"] += 1
            s["xattr_entries"] += 1
        for rel in self.entries:
            if self.kind[rel] in ("file", "dir") and rel not in fixed_x and rng.random() < 0.03:
                os.setxattr(
                    self.abs(rel), b"user.tag", b"v%d" % rng.randrange(10**6), follow_symlinks=False
                )
                s["xattr_entries"] += 1
        # 4. ACLs
        self._setfacl(["-m", "u:1001:rw-,g:1004:r--"], b"acl/explicit")
        self._setfacl(["-m", "m::r--"], b"acl/mask_only")
        self._setfacl(["-m", "u:1005:rwx"], b"modes/m0755")
        self._setfacl(["-m", "u:1006:r-x"], b"odd")
        s["acl_entries"] += 5  # explicit, mask_only, m0755, odd, acl/inherited
        # 5. times, non-directories first, then directories bottom-up
        dirs = []
        for rel in self.entries:
            if self.kind[rel] == "dir":
                dirs.append(rel)
            else:
                self._set_times(rel)
        dirs.sort(key=lambda r: r.count(b"/"), reverse=True)
        for rel in dirs:
            self._set_times(rel)
        os.utime(self.root, ns=(self._ts(), self._ts()))

    def _ts(self) -> int:
        sec = self.rng.randrange(1_000_000_000, 1_700_000_000)
        return sec * 1_000_000_000 + self.rng.randrange(1, 1_000_000_000)

    def _set_times(self, rel: bytes) -> None:
        atime, mtime = self._ts(), self._ts()
        if rel == b"modes/m0600":
            mtime = -123_456_789  # before 1970, non-zero ns
            self.summary["pre_1970_mtimes"] += 1
        elif rel == b"modes/m0640":
            mtime = 7_258_118_400 * 1_000_000_000 + 987_654_321  # year 2200
            self.summary["future_mtimes"] += 1
        os.utime(self.abs(rel), ns=(atime, mtime), follow_symlinks=False)


def make_tree(
    root: Path,
    *,
    seed: int = 1,
    entries: int = 20_000,
    big_sparse: bool = True,
    big_files_mib: int = 4,
    big_dir_files: int = 5000,
    data_mib: int = 0,
) -> dict[str, Any]:
    """Create the hostile sample tree under ``root`` (must be absent or empty).

    Returns a summary dict of counts (see ``_Gen.summary``) plus ``seed``.
    """
    rootb = os.fsencode(root)
    os.makedirs(rootb, exist_ok=True)
    if os.listdir(rootb):
        raise FileExistsError(f"{root!s} is not empty")
    g = _Gen(root, seed, big_dir_files)
    g.build_fixed(big_sparse, big_files_mib)
    g.build_media(data_mib * MIB)
    g.build_bulk(max(0, entries - g.summary["entries"]))
    g.apply_metadata()
    if g.summary["acl_entries"] and g.kind.get(b"acl/inherited") != "file":
        raise AssertionError("acl/inherited missing")
    out: dict[str, Any] = dict(g.summary)
    out["seed"] = seed
    return out


def apply_changes(root: Path, *, seed: int = 2) -> dict[str, Any]:
    """Apply the acceptance-test change mix to a tree made by ``make_tree``.

    Returns a description; all paths are bytes relative to ``root``.
    """
    rng = random.Random(seed)
    r = os.path.abspath(os.fsencode(root))

    def a(rel: bytes) -> bytes:
        return _join(r, rel)

    def write(rel: bytes, data: bytes) -> None:
        with open(a(rel), "wb") as f:
            f.write(data)

    out: dict[str, Any] = {}
    # rename the big directory (into another directory, with a new name)
    os.rename(a(BIG_DIR), a(BIG_DIR_RENAMED))
    out["renamed_dir"] = (BIG_DIR, BIG_DIR_RENAMED)
    out["renamed_dir_files"] = len(os.listdir(a(BIG_DIR_RENAMED)))

    # swap two files through a third name
    os.rename(a(b"chg/swap_a"), a(b"chg/swap_tmp"))
    os.rename(a(b"chg/swap_b"), a(b"chg/swap_a"))
    os.rename(a(b"chg/swap_tmp"), a(b"chg/swap_b"))
    out["swapped"] = (b"chg/swap_a", b"chg/swap_b")

    # file -> directory of the same name, and directory -> file
    os.unlink(a(b"chg/file2dir"))
    os.mkdir(a(b"chg/file2dir"), 0o750)
    write(b"chg/file2dir/child", rng.randbytes(1234))
    out["file_to_dir"] = b"chg/file2dir"
    shutil.rmtree(a(b"chg/dir2file"))
    write(b"chg/dir2file", rng.randbytes(4321))
    out["dir_to_file"] = b"chg/dir2file"

    # delete a subtree
    shutil.rmtree(a(b"chg/delsub"))
    out["deleted_subtree"] = b"chg/delsub"

    # truncate and append
    new_size = 200 * KIB // 2 - 17
    os.truncate(a(b"chg/trunc.bin"), new_size)
    out["truncated"] = (b"chg/trunc.bin", new_size)
    extra = rng.randbytes(12_345)
    with open(a(b"chg/append.bin"), "ab") as f:
        f.write(extra)
    out["appended"] = (b"chg/append.bin", len(extra))

    # overwrite 1 MiB in the middle of the 16 MiB file
    size = os.stat(a(BIG16)).st_size
    off = size // 2 - MIB // 2 + 4096 + 3
    fd = os.open(a(BIG16), os.O_WRONLY)
    try:
        os.pwrite(fd, rng.randbytes(MIB), off)
    finally:
        os.close(fd)
    out["big_file"] = BIG16
    out["overwritten_range"] = (off, MIB)

    # chmod / chown
    os.chmod(a(b"chg/chmod_me"), 0o600)
    os.chmod(a(b"chg/chmod_dir"), 0o700)
    out["chmod"] = [(b"chg/chmod_me", 0o600), (b"chg/chmod_dir", 0o700)]
    out["chown"] = []
    if os.geteuid() == 0:
        for rel in (b"chg/chown_me", b"links/rel"):
            st = os.lstat(a(rel))
            uid = 1000 + (st.st_uid - 1000 + 1) % 11 if st.st_uid >= 1000 else 1009
            gid = 1000 + (st.st_gid - 1000 + 1) % 11 if st.st_gid >= 1000 else 1009
            os.chown(a(rel), uid, gid, follow_symlinks=False)
            out["chown"].append((rel, uid, gid))

    # add a hardlink, remove one (the triple becomes a pair)
    os.link(a(b"chg/hl_src"), a(b"chg/hl_new"))
    out["hardlink_added"] = (b"chg/hl_src", b"chg/hl_new")
    os.unlink(a(b"links/tri1"))
    out["hardlink_removed"] = b"links/tri1"

    # symlink -> directory
    os.unlink(a(b"chg/sym2dir"))
    os.mkdir(a(b"chg/sym2dir"))
    write(b"chg/sym2dir/inside", rng.randbytes(99))
    out["symlink_to_dir"] = b"chg/sym2dir"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--entries", type=int, default=20_000)
    ap.add_argument("--small", action="store_true", help="no 256 MiB sparse file, 1 MiB big files")
    ap.add_argument("--big-dir-files", type=int, default=5000)
    ap.add_argument("--data-mib", type=int, default=0,
                    help="top the written data up to this many MiB with files under media/")
    ap.add_argument(
        "--apply-changes",
        action="store_true",
        help="apply the change mix to an existing tree instead",
    )
    ns = ap.parse_args(argv)
    if ns.apply_changes:
        res: dict[str, Any] = apply_changes(Path(ns.dir), seed=ns.seed)
    else:
        res = make_tree(
            Path(ns.dir),
            seed=ns.seed,
            entries=ns.entries,
            big_sparse=not ns.small,
            big_files_mib=1 if ns.small else 4,
            big_dir_files=ns.big_dir_files,
            data_mib=ns.data_mib,
        )
    json.dump(
        res,
        sys.stdout,
        indent=1,
        default=lambda o: os.fsdecode(o) if isinstance(o, bytes) else str(o),
        ensure_ascii=True,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
