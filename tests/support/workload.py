"""Seeded random workload on a live directory tree, for continuous-replication tests.

Usage as a module (meant to run in its own process, next to a running ``sync``)::

    python -m tests.support.workload ROOT --ops N --seed S [--rate OPS_PER_S] [--no-holes]

prints a JSON object of counts per operation and exits 0.

API: ``run_workload(root, *, ops=1000, seed=1, rate=None, deadline=None) -> dict[str, int]``.

Every kind of change georep replicates is in the mix: entry operations (create, mkdir,
rmdir and rmtree of non-empty directories, unlink, renames of files and directories in
the same directory, across directories and over an existing name, hardlinks added and
removed, symlinks created and replaced, fifos), data operations (write, append,
truncate, overwrite in the middle, files large enough to take the data path) and meta
operations (chmod, chown, utime, setxattr, removexattr).  Some names are not UTF-8.

The generator is single-threaded and picks its targets by a random walk of the tree as
it is now, so it needs no model of the tree; an operation that fails because the tree
is not what the pick expected (vanished, not empty, a rename into itself...) is simply
dropped and another one is drawn.  Never touches ``ROOT/.georep``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable

#: errno values an operation may meet because of the generator's own earlier changes.
_RACES = frozenset({
    errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EINVAL,
    errno.ENAMETOOLONG, errno.EMLINK, errno.ELOOP, errno.ENODATA, errno.EBUSY, errno.EXDEV,
})
#: Deepest directory the generator creates or moves things into (treegen goes to ~45).
MAX_DEPTH = 60
META_DIR = b".georep"

NAME_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789_-. "
ODD = (b"\xff\xfe", b"\xe9t\xe9", b"\x80", "\u00e9\u65e5".encode(), b"\n", b"*?[")

#: Relative weights of the operations.
WEIGHTS: dict[str, int] = {
    "create": 14, "create_big": 1, "write": 6, "append": 5, "truncate": 3,
    "overwrite_middle": 4, "mkdir": 5, "rmdir": 1, "rmtree": 1, "unlink": 6,
    "rename_same_dir": 4, "rename_across": 4, "rename_over": 3, "rename_dir": 2,
    "rename_dir_over": 1, "link": 3, "unlink_link": 2, "symlink": 3, "symlink_replace": 2,
    "chmod": 4, "chown": 3, "utime": 3, "setxattr": 3, "removexattr": 2, "mkfifo": 1,
}


class Skip(Exception):
    """Nothing suitable found for this operation: draw another one."""


class Workload:
    """The generator; ``step()`` performs one random operation."""

    def __init__(self, root: str | bytes | os.PathLike[str], seed: int, *,
                 holes: bool = True) -> None:
        self.root = os.path.abspath(os.fsencode(root))
        self.holes = holes
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.serial = 0
        self.ops: list[str] = list(WEIGHTS)
        self.weights: list[int] = [WEIGHTS[k] for k in self.ops]

    # -- picking targets ------------------------------------------------------------------

    def path(self, rel: bytes) -> bytes:
        return os.path.join(self.root, rel) if rel else self.root

    def _list(self, rel: bytes) -> list[tuple[bytes, os.stat_result]]:
        out = []
        with os.scandir(self.path(rel)) as it:
            for e in it:
                name = os.fsencode(e.name)
                if not rel and name == META_DIR:
                    continue
                try:
                    out.append((name, e.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
        return out

    def _walk(self, want: Callable[[os.stat_result], bool], *, dirs: bool) -> bytes:
        """A random path below the root whose lstat satisfies ``want``.

        ``dirs``: the root and the directories passed on the way may be the answer.
        """
        for _ in range(20):
            rel = b""
            for _depth in range(MAX_DEPTH):
                if dirs and self.rng.random() < 0.3:
                    return rel
                ents = self._list(rel)
                if not ents:
                    break
                # Look at a handful of entries: wide directories are not walked in full.
                sample = self.rng.sample(ents, min(len(ents), 8))
                hits = [n for n, st in sample if want(st)]
                subdirs = [n for n, st in sample if stat.S_ISDIR(st.st_mode)]
                if hits and (not subdirs or self.rng.random() < 0.6):
                    return os.path.join(rel, self.rng.choice(hits)) if rel else \
                        self.rng.choice(hits)
                if not subdirs:
                    break
                sub = self.rng.choice(subdirs)
                rel = os.path.join(rel, sub) if rel else sub
            if dirs:
                return rel
        raise Skip

    def any_dir(self) -> bytes:
        return self._walk(lambda st: stat.S_ISDIR(st.st_mode), dirs=True)

    def sub_dir(self) -> bytes:
        rel = self.any_dir()
        if not rel:
            raise Skip
        return rel

    def file(self) -> bytes:
        return self._walk(lambda st: stat.S_ISREG(st.st_mode), dirs=False)

    def nondir(self) -> bytes:
        return self._walk(lambda st: not stat.S_ISDIR(st.st_mode), dirs=False)

    def symlink_path(self) -> bytes:
        return self._walk(lambda st: stat.S_ISLNK(st.st_mode), dirs=False)

    def linked_file(self) -> bytes:
        return self._walk(lambda st: stat.S_ISREG(st.st_mode) and st.st_nlink > 1, dirs=False)

    def new_name(self) -> bytes:
        self.serial += 1
        n = self.rng.randint(3, 12)
        name = bytes(self.rng.choice(NAME_CHARS) for _ in range(n)).strip(b" .") or b"x"
        if self.rng.random() < 0.08:
            name += self.rng.choice(ODD)
        return b"w%d-%s" % (self.serial, name)

    def new_path(self, parent: bytes | None = None) -> bytes:
        d = self.any_dir() if parent is None else parent
        if d.count(b"/") >= MAX_DEPTH - 2:
            raise Skip
        return os.path.join(d, self.new_name()) if d else self.new_name()

    def content(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))

    # -- operations ---------------------------------------------------------------------

    def op_create(self) -> None:
        with open(self.path(self.new_path()), "xb") as f:
            f.write(self.content(0, 8192))

    def op_create_big(self) -> None:
        with open(self.path(self.new_path()), "xb") as f:
            f.write(self.content(70_000, 600_000))  # over the inline limit: the data path

    def _open_file(self, flags: int) -> int:
        return os.open(self.path(self.file()), flags | os.O_NOFOLLOW | os.O_NONBLOCK)

    def op_write(self) -> None:
        fd = self._open_file(os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, self.content(0, 16384))
        finally:
            os.close(fd)

    def op_append(self) -> None:
        fd = self._open_file(os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, self.content(1, 4096))
        finally:
            os.close(fd)

    def op_truncate(self) -> None:
        fd = self._open_file(os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            # Growing past the last block leaves a hole; without ``holes``, stay inside it.
            top = max(1, size * 2) if self.holes and size < 1 << 20 else size
            if not self.holes:
                top = max(top, -(-size // 4096) * 4096)
            os.ftruncate(fd, self.rng.randint(0, top))
        finally:
            os.close(fd)

    def op_overwrite_middle(self) -> None:
        fd = self._open_file(os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            os.pwrite(fd, self.content(1, 2048), self.rng.randint(0, size))
        finally:
            os.close(fd)

    def op_mkdir(self) -> None:
        os.mkdir(self.path(self.new_path()), self.rng.choice((0o755, 0o700, 0o775, 0o1777)))

    def op_rmdir(self) -> None:
        os.rmdir(self.path(self.sub_dir()))

    def op_rmtree(self) -> None:
        rel = self.sub_dir()
        p = self.path(rel)
        # Keep the tree alive: only prune subtrees of modest size.
        n = 0
        for _dirpath, dirnames, filenames in os.walk(p):
            n += len(dirnames) + len(filenames)
            if n > 300:
                raise Skip
        shutil.rmtree(p)

    def op_unlink(self) -> None:
        os.unlink(self.path(self.nondir()))

    def op_rename_same_dir(self) -> None:
        rel = self.nondir() if self.rng.random() < 0.8 else self.sub_dir()
        parent = os.path.dirname(rel)
        os.rename(self.path(rel), self.path(self.new_path(parent)))

    def op_rename_across(self) -> None:
        os.rename(self.path(self.nondir()), self.path(self.new_path()))

    def op_rename_over(self) -> None:
        src, dst = self.nondir(), self.nondir()
        if src == dst:
            raise Skip
        os.replace(self.path(src), self.path(dst))

    def op_rename_dir(self) -> None:
        src = self.sub_dir()
        dst = self.new_path()
        if dst.startswith(src + b"/"):
            raise Skip  # into itself: EINVAL anyway
        os.rename(self.path(src), self.path(dst))

    def op_rename_dir_over(self) -> None:
        src, dst = self.sub_dir(), self.sub_dir()
        if src == dst or dst.startswith(src + b"/") or src.startswith(dst + b"/"):
            raise Skip
        os.rename(self.path(src), self.path(dst))  # ENOTEMPTY unless dst is empty

    def op_link(self) -> None:
        os.link(self.path(self.file()), self.path(self.new_path()), follow_symlinks=False)

    def op_unlink_link(self) -> None:
        os.unlink(self.path(self.linked_file()))

    def _target(self) -> bytes:
        r = self.rng.random()
        if r < 0.5:
            return self.nondir() if self.rng.random() < 0.5 else self.new_name()
        if r < 0.8:
            return b"../" + self.new_name()
        return b"/nonexistent/" + self.new_name()

    def op_symlink(self) -> None:
        os.symlink(self._target(), self.path(self.new_path()))

    def op_symlink_replace(self) -> None:
        rel = self.symlink_path()
        tmp = self.new_path(os.path.dirname(rel))
        os.symlink(self._target(), self.path(tmp))
        os.replace(self.path(tmp), self.path(rel))

    def op_chmod(self) -> None:
        rel = self.any_dir() if self.rng.random() < 0.2 else self.file()
        mode = self.rng.choice((0o644, 0o600, 0o755, 0o640, 0o4755, 0o2755, 0o444, 0o1777))
        if stat.S_ISDIR(os.lstat(self.path(rel)).st_mode):
            mode |= 0o700  # keep the tree walkable for non-root readers
        os.chmod(self.path(rel), mode)

    def op_chown(self) -> None:
        rel = self.nondir() if self.rng.random() < 0.8 else self.any_dir()
        os.chown(self.path(rel), self.rng.randint(0, 3000), self.rng.randint(0, 3000),
                 follow_symlinks=False)

    def op_utime(self) -> None:
        rel = self.nondir() if self.rng.random() < 0.8 else self.any_dir()
        t = self.rng.randint(0, 2_000_000_000) * 1_000_000_000 + self.rng.randint(0, 10**9 - 1)
        os.utime(self.path(rel), ns=(t, t), follow_symlinks=False)

    def op_setxattr(self) -> None:
        rel = self.file() if self.rng.random() < 0.8 else self.any_dir()
        name = b"user.wl%d" % self.rng.randint(0, 5)
        os.setxattr(self.path(rel), name, self.content(0, 200))

    def op_removexattr(self) -> None:
        rel = self.file() if self.rng.random() < 0.8 else self.any_dir()
        p = self.path(rel)
        names = [n for n in os.listxattr(p) if n.startswith("user.wl")]
        if not names:
            raise Skip
        os.removexattr(p, self.rng.choice(names))

    def op_mkfifo(self) -> None:
        os.mkfifo(self.path(self.new_path()), 0o644)

    # -- driving ------------------------------------------------------------------------

    def step(self) -> str:
        """Perform one operation (drawing again after races); returns its name."""
        for _ in range(200):
            op = self.rng.choices(self.ops, self.weights)[0]
            try:
                getattr(self, f"op_{op}")()
            except Skip:
                continue
            except OSError as e:
                if e.errno in _RACES:
                    self.counts["retried"] += 1
                    continue
                raise
            self.counts[op] += 1
            return op
        raise RuntimeError(f"no operation possible under {os.fsdecode(self.root)!r}")


def run_workload(root: str | bytes | os.PathLike[str], *, ops: int = 1000, seed: int = 1,
                 rate: float | None = None, deadline: float | None = None,
                 holes: bool = True) -> dict[str, int]:
    """Perform ``ops`` random operations under ``root`` (at ``rate`` per second if given).

    ``deadline`` (``time.monotonic()``): stop early when reached.  ``holes=False``: no
    operation makes a file sparse (truncate grows a file only within its last 4 KiB
    block).  Returns counts per op
    (``total``: operations done; ``retried``: draws dropped because of the tree's state).
    """
    w = Workload(root, seed, holes=holes)
    t0 = time.monotonic()
    done = 0
    while done < ops:
        if deadline is not None and time.monotonic() >= deadline:
            break
        if rate:
            ahead = t0 + done / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing, not synchronisation
        w.step()
        done += 1
    out = dict(sorted(w.counts.items()))
    out["total"] = done
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--ops", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=None, help="operations per second")
    ap.add_argument("--no-holes", action="store_true",
                    help="never make a file sparse (truncate grows only within a block)")
    ns = ap.parse_args(argv)
    counts = run_workload(ns.root, ops=ns.ops, seed=ns.seed, rate=ns.rate,
                          holes=not ns.no_holes)
    json.dump(counts, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
