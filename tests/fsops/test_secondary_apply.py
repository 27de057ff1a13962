"""Parallel apply (fsops.secondary_apply): the dispatch rule, and real batches applied
with a pool giving exactly what one thread gives."""

from __future__ import annotations

import os
import stat
import threading
import uuid
from pathlib import Path

import pytest

from fsops.constants import ROOT_GFID
from fsops.secondary import SecondaryFS
from fsops.secondary_apply import ParallelApplier, _Phase, plan_local
from fsops.secondary_index import FdCache

R = ROOT_GFID
T1 = 1_650_000_000_987_654_321


def G() -> bytes:
    return uuid.uuid4().bytes


def ensure(pgfid: bytes, name: bytes, gfid: bytes, type_: str, **kw) -> dict:
    return {"op": "ensure", "pgfid": pgfid, "name": name, "gfid": gfid, "type": type_, **kw}


def meta(mode: int = 0o755, mtime: int = T1) -> dict:
    return {"mode": mode, "uid": os.getuid(), "gid": os.getgid(), "atime": mtime,
            "mtime": mtime}


# -- the rule, as a pure function --------------------------------------------------------

def _plan(op: dict, phase: _Phase, *, free: bool = True, known: bool = False):
    return plan_local(op, phase, lambda p, n: free, lambda g: known)


def _run(op: dict, phase: _Phase, fut: object = "f") -> None:
    # Record ``op`` in ``phase`` as ParallelApplier does after submitting it.
    ParallelApplier._record(op, fut, phase)  # type: ignore[arg-type]


def test_plain_creates_are_local_without_dependencies() -> None:
    ph = _Phase()
    for t in ("f", "d", "l"):
        assert _plan(ensure(R, t.encode(), G(), t), ph) == []


@pytest.mark.parametrize("op", [
    {"op": "delete", "pgfid": R, "name": b"a", "gfid": G()},
    {"op": "rename", "gfid": G(), "pgfid": R, "name": b"a", "npgfid": R, "nname": b"b",
     "type": "f"},
    ensure(R, b"fifo", G(), "p"),
    ensure(R, b"dev", G(), "c", rdev=5),
    ensure(R, b"bad/name", G(), "f"),
    ensure(R, b"x", b"short", "f"),
    {"op": "meta", "gfid": G(), "meta": "not a map"},
    "not an op",
])
def test_other_ops_are_serial(op: object) -> None:
    assert _plan(op, _Phase()) is None  # type: ignore[arg-type]


def test_taken_name_or_known_gfid_is_serial() -> None:
    # The ensure would evict, adopt, keep, link or rename: not local.
    assert _plan(ensure(R, b"a", G(), "f"), _Phase(), free=False) is None
    assert _plan(ensure(R, b"a", G(), "f"), _Phase(), known=True) is None


def test_second_link_of_a_new_gfid_and_reused_name_are_serial() -> None:
    ph = _Phase()
    x = G()
    first = ensure(R, b"a", x, "f")
    assert _plan(first, ph) == []
    _run(first, ph)
    assert _plan(ensure(R, b"b", x, "f"), ph) is None  # hardlink: link from the index
    assert _plan(ensure(R, b"a", G(), "f"), ph) is None  # same name again


def test_inside_a_new_directory_waits_for_it() -> None:
    ph = _Phase()
    d = G()
    mk = ensure(R, b"d", d, "d")
    _run(mk, ph, "mkdir")
    # No lookup of the name in a directory this phase creates: it is empty.
    assert plan_local(ensure(d, b"f", G(), "f"), ph, lambda p, n: False,
                      lambda g: False) == ["mkdir"]


def test_directory_meta_waits_for_its_entries_and_blocks_later_entries() -> None:
    ph = _Phase()
    d = G()
    _run(ensure(R, b"d", d, "d"), ph, "mkdir")
    _run(ensure(d, b"a", G(), "f"), ph, "a")
    _run(ensure(d, b"b", G(), "f"), ph, "b")
    deps = _plan({"op": "meta", "gfid": d, "meta": meta()}, ph)
    assert sorted(deps) == ["a", "b", "mkdir"]
    _run({"op": "meta", "gfid": d, "meta": meta()}, ph, "meta-d")
    # An entry after the directory's meta would move its times: serial, after a drain.
    assert _plan(ensure(d, b"c", G(), "f"), ph) is None
    # A second meta of the same gfid comes after the first.
    assert "meta-d" in _plan({"op": "meta", "gfid": d, "meta": meta()}, ph)


# -- real batches: a pool gives what one thread gives ------------------------------------

def _snapshot(root: Path) -> list[tuple]:
    """Everything the replica shows: names, types, modes, sizes, mtimes, content, link
    structure (inodes numbered by first appearance), symlink targets.  .georep excluded."""
    rows: list[tuple] = []
    inos: dict[int, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = sorted(d for d in dirnames if d != ".georep")
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            body: object = None
            if stat.S_ISREG(st.st_mode):
                body = Path(p).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            ino = inos.setdefault(st.st_ino, len(inos))
            rows.append((os.path.join(rel, name), stat.S_IFMT(st.st_mode),
                         stat.S_IMODE(st.st_mode), st.st_mtime_ns if not stat.S_ISLNK(
                             st.st_mode) else None, ino, body))
        st = os.stat(dirpath)
        rows.append((rel, "dir-times", st.st_mtime_ns))
    return rows


def _batch() -> list[dict]:
    """A crawl-shaped batch: nested new directories with files, symlinks, a hardlink
    pair across directories, directory meta after entries, and serial ops between."""
    ops: list[dict] = []
    top = [G() for _ in range(4)]
    hard = G()
    for i, d in enumerate(top):
        ops.append(ensure(R, b"d%d" % i, d, "d", meta=meta(0o750, T1 + i)))
    for i, d in enumerate(top):
        sub = G()
        ops.append(ensure(d, b"sub", sub, "d", meta=meta(0o700, T1 + 10 + i)))
        for j in range(12):
            ops.append(ensure(d, b"f%02d" % j, G(), "f", data=b"x" * (i * 100 + j),
                              meta=meta(0o640, T1 + 100 + j)))
            ops.append(ensure(sub, b"g%02d" % j, G(), "f", data=b"%d" % j,
                              meta=meta(0o600, T1 + 200 + j)))
        ops.append(ensure(d, b"link", G(), "l", target=b"f00", meta=meta(0o777, T1)))
        if i == 1:
            ops.append(ensure(d, b"hard", hard, "f", data=b"same inode", meta=meta(0o644)))
        if i == 3:
            ops.append(ensure(d, b"hard2", hard, "f", meta=meta(0o644)))  # serial: link
            ops.append(ensure(d, b"f00", G(), "f", data=b"replaced", meta=meta()))  # evicts
        ops.append({"op": "meta", "gfid": sub, "meta": meta(0o711, T1 + 300 + i)})
        ops.append({"op": "meta", "gfid": d, "meta": meta(0o755, T1 + 400 + i)})
    ops.append({"op": "delete", "pgfid": top[0], "name": b"f03", "gfid": G()})  # other
    ops.append({"op": "meta", "gfid": R, "meta": meta(0o755, T1 + 999)})
    return ops


@pytest.mark.parametrize("threads", [2, 4])
def test_pool_result_equals_one_thread(tmp_path: Path, threads: int) -> None:
    batch = _batch()
    trees = {}
    results = {}
    counts = {}
    for n in (1, threads):
        root = tmp_path / f"t{n}"
        fs = SecondaryFS(bytes(root), create=True)
        pa = ParallelApplier(fs, n)
        try:
            results[n] = [r["s"] for r in pa.apply_ops(batch)]
            # A replay (the batch holds its own replacement of d3/f00, so it relinks that
            # name twice; everything else is kept), on the pool too.
            again = [r["s"] for r in pa.apply_ops(batch)]
            counts[n] = (pa.parallel, pa.serial)
        finally:
            pa.close()
            fs.close()
        trees[n] = _snapshot(root)
        assert "error" not in results[n], results[n]
        assert set(again) <= {"kept", "applied", "other", "linked"}, again
        assert again.count("linked") == 2
        results[n] += again
    assert results[threads] == results[1]
    assert trees[threads] == trees[1]
    assert counts[1] == (0, 2 * len(batch))
    par, ser = counts[threads]
    assert par + ser == 2 * len(batch)
    # First application: all but the hardlink, the eviction and the delete run on the
    # pool (and the creates after the eviction that depend on it); the replay finds every
    # name taken, so its ensures are serial.
    assert par > len(batch) // 2


def test_directory_times_survive_parallel_entries(tmp_path: Path) -> None:
    """A directory's meta (its mtime) lands after all of its entries, whichever thread
    created them: otherwise a late create would move the mtime again."""
    fs = SecondaryFS(bytes(tmp_path / "s"), create=True)
    pa = ParallelApplier(fs, 4)
    try:
        ops: list[dict] = []
        dirs = [G() for _ in range(6)]
        for i, d in enumerate(dirs):
            ops.append(ensure(R, b"d%d" % i, d, "d"))
            ops += [ensure(d, b"f%03d" % j, G(), "f", data=b"z" * 512) for j in range(60)]
            ops.append({"op": "meta", "gfid": d, "meta": meta(0o755, T1 + i)})
        res = pa.apply_ops(ops)
        assert all(r["s"] in ("created", "applied") for r in res), res
        for i in range(6):
            assert os.stat(tmp_path / "s" / f"d{i}").st_mtime_ns == T1 + i
            assert len(os.listdir(tmp_path / "s" / f"d{i}")) == 60
        assert pa.serial == 0
    finally:
        pa.close()
        fs.close()


def test_failures_stay_values_in_order(tmp_path: Path) -> None:
    fs = SecondaryFS(bytes(tmp_path / "s"), create=True)
    pa = ParallelApplier(fs, 3)
    try:
        missing = G()
        ops = [ensure(R, b"a", G(), "f", data=b"1"),
               ensure(missing, b"x", G(), "f"),  # unknown parent: serial, an error value
               ensure(R, b"b", G(), "f", data=b"2"),
               {"op": "meta", "gfid": G(), "meta": meta()}]  # unknown gfid: ENOENT
        res = pa.apply_ops(ops)
        assert [r["s"] for r in res] == ["created", "error", "created", "error"]
        assert (tmp_path / "s" / "b").read_bytes() == b"2"
    finally:
        pa.close()
        fs.close()


def test_fd_cache_defers_closing_while_held(tmp_path: Path) -> None:
    """While threads share the cache, an evicted fd stays open (a closed fd number could
    be reused by another open and name another directory) until the hold ends."""
    dirs = []
    for i in range(3):
        p = tmp_path / f"d{i}"
        p.mkdir()
        dirs.append(os.open(p, os.O_RDONLY | os.O_DIRECTORY))
    cache = FdCache(1)
    cache.hold()
    cache.put(b"a", dirs[0])
    cache.put(b"b", dirs[1])  # evicts a
    cache.drop(b"b")
    os.fstat(dirs[0])  # still open
    os.fstat(dirs[1])
    cache.put(b"c", dirs[2])
    cache.release()
    for fd in dirs[:2]:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert cache.get(b"c") == dirs[2]
    cache.close_all()


def test_fd_cache_is_consistent_under_threads(tmp_path: Path) -> None:
    paths = []
    for i in range(40):
        p = tmp_path / f"d{i}"
        p.mkdir()
        paths.append(p)
    cache = FdCache(8)
    cache.hold()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for r in range(200):
                i = (k * 7 + r) % 40
                key = b"%d" % i
                fd = cache.get(key)
                if fd is None:
                    fd = os.open(paths[i], os.O_RDONLY | os.O_DIRECTORY)
                    cache.put(key, fd)
                # The fd must still name this directory.
                assert os.fstat(fd).st_ino == os.stat(paths[i]).st_ino
        except BaseException as e:  # collected for the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    cache.release()
    cache.close_all()
    assert not errors, errors[:3]


def test_fd_cache_checks_each_directory_once_per_hold(tmp_path: Path) -> None:
    """Outside a batch every get re-checks that the directory exists; inside one, the
    first get does (the batch's own removals drop their entries)."""
    p = tmp_path / "d"
    p.mkdir()
    cache = FdCache(4)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    cache.put(b"d", fd)
    cache.hold()
    assert cache.get(b"d") == fd
    p.rmdir()
    assert cache.get(b"d") == fd  # already checked in this hold
    cache.release()
    assert cache.get(b"d") is None  # re-checked: removed, dropped and closed
    with pytest.raises(OSError):
        os.fstat(fd)
    q = tmp_path / "e"
    q.mkdir()
    fd = os.open(q, os.O_RDONLY | os.O_DIRECTORY)
    cache.put(b"e", fd)
    q.rmdir()
    assert cache.get(b"e") is None  # no hold: checked on every get
    cache.close_all()
