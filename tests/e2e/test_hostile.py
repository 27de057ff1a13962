"""Hostile input against the real secondary host process (issue 7).

Each test starts ``georep-node secondary --root ROOT`` as the primary would, plants canary
files and directories OUTSIDE the root (``tmp_path/outside``; the host's cwd is in there
too, so a stray relative write would land among the canaries), attacks it with crafted
requests, planted symlinks and hardlinks, a tampered ``.georep`` and malformed frames, and
then checks that

- everything outside the root (all of ``tmp_path`` minus the root) is unchanged: content,
  mode, owner, mtime, xattrs, symlink targets, directory listings;
- every attack got a clear answer: an error reply (the stream stays in sync: a ping after
  it works), or a one-line reason on stderr and a non-zero exit; never a Python traceback.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from fsops.constants import GFID_XATTR, LIMBO_GFID, ROOT_GFID
from fsops.secondary_index import BUCKET_CHARS, hexname
from transport import (
    MAGIC,
    Channel,
    FrameReader,
    NotFound,
    RemoteError,
    SchemaError,
    encode_frame,
    spawn_local,
)
from transport.framing import HEADER, MAX_BODY, MAX_PAYLOAD

REPO = Path(__file__).resolve().parents[2]
NODE = str(REPO / "bin" / "georep-node")
R = ROOT_GFID
T1 = 1_650_000_000_987_654_321
CANARY = b"canary: must never change\n"


def G(first: int | None = None) -> bytes:
    g = uuid.uuid4().bytes
    return g if first is None else bytes([first]) + g[1:]


def ensure(pgfid: bytes, name: bytes, gfid: bytes, type_: str, **kw: Any) -> dict:
    return {"op": "ensure", "pgfid": pgfid, "name": name, "gfid": gfid, "type": type_, **kw}


def delete(pgfid: bytes, name: bytes, gfid: bytes) -> dict:
    return {"op": "delete", "pgfid": pgfid, "name": name, "gfid": gfid}


def rename(gfid: bytes, pgfid: bytes, name: bytes, npgfid: bytes, nname: bytes,
           type_: str) -> dict:
    return {"op": "rename", "gfid": gfid, "pgfid": pgfid, "name": name, "npgfid": npgfid,
            "nname": nname, "type": type_}


def meta_op(gfid: bytes, **m: Any) -> dict:
    return {"op": "meta", "gfid": gfid, "meta": m}


HOSTILE_META = {"mode": 0o6777, "uid": 4321, "gid": 4321, "atime": T1, "mtime": T1,
                "xattrs": {b"user.pwned": b"1"}}


# -- what lies outside the root --------------------------------------------------------------

def snapshot(top: Path, exclude: set[str]) -> dict[str, tuple]:
    """State of everything under ``top`` except the top-level names in ``exclude``.

    ctime and nlink are left out: unlinking a planted hardlink changes them without
    writing the file.
    """
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        rel_dir = os.path.relpath(dirpath, top)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in exclude]
            filenames = [f for f in filenames if f not in exclude]
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra: Any = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                extra = sorted(os.listdir(p))
            else:
                extra = None
            try:
                xa = sorted((k, os.getxattr(p, k, follow_symlinks=False))
                            for k in os.listxattr(p, follow_symlinks=False))
            except OSError:
                xa = []
            mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                           mtime, extra, tuple(xa))
    return out


class Env:
    """A secondary root in ``tmp/sec``, canaries in ``tmp/outside``, and the host process."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "sec"
        self.outside = tmp / "outside"
        self.cwd = self.outside / "cwd"
        self.exclude = {"sec", "sec2"}
        (self.outside / "sub").mkdir(parents=True)
        self.cwd.mkdir()
        for p in (self.outside / "x", self.outside / "canary", self.outside / "sub" / "f"):
            p.write_bytes(CANARY)
            p.chmod(0o644)
        os.setxattr(self.outside / "x", b"user.keep", b"me")
        os.symlink("x", self.outside / "link")
        self.root.mkdir()
        self.before = snapshot(tmp, self.exclude)
        self.hosts: list[Host] = []

    def start(self, root: Path | None = None) -> Host:
        h = Host(root or self.root, self.cwd)
        self.hosts.append(h)
        return h

    def index_path(self, gfid: bytes, root: Path | None = None) -> Path:
        h = hexname(gfid).decode()
        return (root or self.root) / ".georep" / "gfid" / h[:BUCKET_CHARS] / h

    def plant_index(self, gfid: bytes) -> Path:
        p = self.index_path(gfid)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def assert_outside_unchanged(self) -> None:
        after = snapshot(self.tmp, self.exclude)
        changed = {k for k in set(self.before) | set(after)
                   if self.before.get(k) != after.get(k)}
        assert not changed, f"written outside the root: {sorted(changed)}"


class Host:
    """The real ``georep-node secondary`` with a Channel after the handshake."""

    def __init__(self, root: Path, cwd: Path) -> None:
        self.lines: list[bytes] = []
        self.proc, self.chan = spawn_local(
            [sys.executable, NODE, "secondary", "--root", str(root)],
            stderr_handler=self.lines.append, cwd=str(cwd))
        self.chan.handshake(timeout=30)

    def call(self, method: str, args: dict | None = None, payload: bytes | None = None) -> Any:
        return self.chan.call(method, args or {}, payload, timeout=30)

    def fails(self, method: str, args: dict | None = None, payload: bytes | None = None,
              exc: type[BaseException] | tuple = (RemoteError, OSError)) -> BaseException:
        with pytest.raises(exc) as info:
            self.call(method, args, payload)
        assert str(info.value), "an error reply must say why"
        return info.value

    def ops(self, *ops: dict) -> list[dict]:
        res = self.call("ops", {"ops": list(ops)})
        assert len(res) == len(ops)
        return res

    def statuses(self, *ops: dict) -> list[str]:
        return [r["s"] for r in self.ops(*ops)]

    def stop(self) -> int:
        assert self.call("ping") is None, "the stream must still be in sync"
        self.chan.close()
        rc = self.proc.wait(30)
        self.assert_no_traceback()
        return rc

    def assert_no_traceback(self) -> None:
        time.sleep(0.05)  # let the relay thread deliver the last lines
        text = b"\n".join(self.lines)
        assert b"Traceback" not in text, text.decode(errors="replace")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    for h in e.hosts:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()


def errors(results: list[dict]) -> list[int]:
    return [r["errno"] for r in results if r["s"] == "error"]


# -- 1. symlinks planted inside the root ------------------------------------------------------

@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_planted_symlinks_to_outside(env: Env, kind: str) -> None:
    h = env.start()
    D = G()
    assert h.statuses(ensure(R, b"d", D, "d")) == ["created"]
    # Planted behind the host's back: at the root and inside a replicated directory.
    target = str(env.outside) if kind == "absolute" else "../outside"
    os.symlink(target, env.root / "evil")
    os.symlink(str(env.outside) if kind == "absolute" else "../../outside",
               env.root / "d" / "evil")
    os.symlink(str(env.outside / "x") if kind == "absolute" else "../outside/x",
               env.root / "evilfile")
    F, S, SUB = G(), G(), G()

    # Named as the target of ensure: the symlink is evicted and replaced, never followed.
    assert h.statuses(ensure(R, b"evilfile", F, "f", data=b"PWNED", meta=HOSTILE_META)) \
        == ["created"]
    assert not (env.root / "evilfile").is_symlink()
    assert h.call("data_write", {"gfid": F, "offset": 0}, b"PWNED AGAIN") == 11
    h.call("data_finish", {"gfid": F, "size": 3, "meta": HOSTILE_META})
    # A directory ensured over the symlink: evicted to limbo (it is a symlink: unlinked).
    assert h.statuses(ensure(D, b"evil", SUB, "d", meta=HOSTILE_META)) == ["created"]
    assert h.statuses(ensure(SUB, b"inner", G(), "f", data=b"PWNED")) == ["created"]
    assert (env.root / "d" / "evil" / "inner").read_bytes() == b"PWNED"
    # Adopting the symlink itself (same kind, same target) applies meta without following.
    assert h.statuses(ensure(R, b"evil", S, "l", target=target.encode(),
                             meta=HOSTILE_META)) == ["adopted"]
    assert h.statuses(meta_op(S, **HOSTILE_META)) == ["applied"]
    # delete / rename naming the symlink as the source or the target.
    assert h.statuses(delete(R, b"evil", G())) == ["other"]
    X = G()
    assert h.statuses(ensure(R, b"x", X, "f", data=b"mine")) == ["created"]
    os.symlink(target, env.root / "evil2")
    assert h.statuses(rename(X, R, b"x", R, b"evil2", "f")) == ["renamed"]
    assert (env.root / "evil2").read_bytes() == b"mine"
    assert h.statuses(rename(S, R, b"evil", D, b"moved", "l")) == ["renamed"]
    assert os.readlink(env.root / "d" / "moved") == target
    assert h.statuses(delete(D, b"moved", S)) == ["deleted"]
    # Symlink replaced by a directory (no gfid) and written through: adopted, stays inside.
    os.symlink(target, env.root / "swap")
    ok = h.statuses(ensure(R, b"swap", G(), "f", data=b"PWNED"))
    assert ok == ["created"]
    os.unlink(env.root / "swap")
    (env.root / "swap").mkdir()
    W = G()
    assert h.statuses(ensure(R, b"swap", W, "d")) == ["adopted"]
    assert h.statuses(ensure(W, b"f", G(), "f", data=b"inside")) == ["created"]
    assert (env.root / "swap" / "f").read_bytes() == b"inside"
    assert h.call("end_crawl")["purged"] >= 0
    assert h.stop() == 0
    env.assert_outside_unchanged()


def test_replicated_dir_swapped_for_symlink(env: Env) -> None:
    """A directory the host knows, renamed away and replaced by a symlink to outside."""
    h = env.start()
    D = G()
    assert h.statuses(ensure(R, b"d", D, "d")) == ["created"]
    os.rename(env.root / "d", env.root / "d.moved")
    os.symlink(str(env.outside), env.root / "d")
    # The host's cached fd still names the real directory: the write lands in d.moved.
    assert h.statuses(ensure(D, b"f", G(), "f", data=b"x")) == ["created"]
    assert (env.root / "d.moved" / "f").exists()
    # A fresh host resolves D through its index record "<root>/d": the symlink is refused.
    assert h.stop() == 0
    h2 = env.start()
    res = h2.ops(ensure(D, b"g", G(), "f", data=b"x"))
    assert errors(res) == [errno.ENOENT]
    with pytest.raises(NotFound):
        h2.call("list_dir", {"gfid": D})
    # Its own ensure finds the directory at d.moved by gfid? No: by name only; the primary's
    # ensure of "d" evicts the symlink and renames the directory back from d.moved.
    assert h2.statuses(ensure(R, b"d", D, "d")) in (["renamed"], ["created"])
    assert not (env.root / "d").is_symlink()
    assert h2.stop() == 0
    env.assert_outside_unchanged()


# -- 2. tampered index entries -------------------------------------------------------------

def test_index_entry_hardlinked_to_outside_file(env: Env) -> None:
    h = env.start()
    A, B, C = G(), G(), G()
    for g in (A, B, C):
        os.link(env.outside / "x", env.plant_index(g))
    # Data and meta straight to the tampered gfid: refused, never written through.
    h.fails("data_write", {"gfid": A, "offset": 0}, b"PWNED", exc=NotFound)
    h.fails("data_finish", {"gfid": A, "size": 0, "meta": HOSTILE_META}, exc=NotFound)
    h.fails("data_hole", {"gfid": A, "offset": 0, "length": 4096}, exc=NotFound)
    assert errors(h.ops(meta_op(A, **HOSTILE_META))) == [errno.ENOENT]
    assert errors(h.ops(rename(B, R, b"nope", R, b"b", "f"))) == [errno.ENOENT]
    assert h.call("stat_gfid", {"gfid": A}) is None
    assert h.call("lookup", {"gfids": [A, B]}) == [None, None]
    # LINK: ensure of the gfid elsewhere must not hardlink the outside inode into the root.
    assert h.statuses(ensure(R, b"a", A, "f", data=b"PWNED", meta=HOSTILE_META)) \
        == ["created"]
    assert (env.root / "a").stat().st_ino != (env.outside / "x").stat().st_ino
    assert h.call("data_write", {"gfid": A, "offset": 0}, b"PWNED") == 5
    h.call("data_finish", {"gfid": A, "size": 5, "meta": HOSTILE_META})
    assert (env.root / "a").read_bytes() == b"PWNED"
    # A planted hardlink at a name (no gfid): not adopted, replaced by a private copy.
    os.link(env.outside / "canary", env.root / "hl")
    assert h.statuses(ensure(R, b"hl", C, "f", data=b"PWNED", meta=HOSTILE_META)) \
        == ["created"]
    assert (env.root / "hl").read_bytes() == b"PWNED"
    assert h.call("end_crawl")["purged"] >= 0
    assert h.stop() == 0
    env.assert_outside_unchanged()


@pytest.mark.parametrize("target", ["../../../../outside/x", "ABS", "../../../../outside",
                                    "..", "0" * 32 + "/..", "0" * 31 + "1/../outside"])
def test_index_entry_symlink_pointing_outside(env: Env, target: str) -> None:
    if target == "ABS":
        target = str(env.outside / "x")
    h = env.start()
    gs = [G() for _ in range(6)]
    for g in gs:
        os.symlink(target, env.plant_index(g))
    a, b, c, d, e, f = gs
    h.fails("data_write", {"gfid": a, "offset": 0}, b"PWNED", exc=NotFound)
    h.fails("data_sigs", {"gfid": a, "offset": 0, "length": 10, "block": 4}, exc=NotFound)
    with pytest.raises(NotFound):
        h.call("list_dir", {"gfid": a})
    assert h.call("stat_gfid", {"gfid": a}) is None
    assert errors(h.ops(meta_op(a, **HOSTILE_META))) == [errno.ENOENT]
    # RENAME of a gfid known only through the tampered record: unknown, whatever the type.
    for t in ("d", "l", "f"):
        assert errors(h.ops(rename(b, R, b"nope", R, b"b", t))) == [errno.ENOENT]
    # As a parent: the record is no "<parent gfid>/<name>": unknown parent.
    assert errors(h.ops(ensure(c, b"child", G(), "f", data=b"PWNED"))) == [errno.ENOENT]
    assert errors(h.ops(delete(c, b"x", G()))) == []  # absent parent: nothing to delete
    # ensure of the gfid itself replaces the bad record with a real object inside the root.
    assert h.statuses(ensure(R, b"d", d, "d"), ensure(R, b"e", e, "f", data=b"in"),
                      ensure(R, b"f", f, "l", target=b"../../outside")) \
        == ["created", "created", "created"]
    assert h.statuses(ensure(d, b"child", G(), "f", data=b"inside")) == ["created"]
    assert (env.root / "d" / "child").read_bytes() == b"inside"
    assert h.call("end_crawl")["purged"] >= 0
    assert h.stop() == 0
    env.assert_outside_unchanged()


def test_dir_record_through_planted_symlink(env: Env) -> None:
    """A well-formed directory record whose path crosses a symlink is never followed."""
    h = env.start()
    D, E = G(), G()
    assert h.statuses(ensure(R, b"d", D, "d")) == ["created"]
    os.symlink(str(env.outside), env.root / "evil")
    os.symlink("../../outside/sub", env.root / "d" / "evil")
    assert h.stop() == 0  # one host per root (session lock): each record gets a fresh host
    # E claims to be "<root>/evil", then "<D>/evil", then a real dir with another gfid.
    p = env.plant_index(E)
    for rec in (R.hex() + "/evil", D.hex() + "/evil", R.hex() + "/d", LIMBO_GFID.hex() + "/x"):
        if p.is_symlink():
            p.unlink()
        os.symlink(rec, p)
        h2 = env.start()
        assert errors(h2.ops(ensure(E, b"f", G(), "f", data=b"PWNED"))) == [errno.ENOENT]
        assert errors(h2.ops(meta_op(E, **HOSTILE_META))) == [errno.ENOENT]
        assert h2.call("stat_gfid", {"gfid": E}) is None
        assert h2.stop() == 0
    # The outside dir, given the gfid xattr by hand, still cannot be reached by name.
    os.setxattr(env.outside, GFID_XATTR, E)
    try:
        p.unlink()
        os.symlink(R.hex() + "/evil", p)
        h3 = env.start()
        assert errors(h3.ops(ensure(E, b"f", G(), "f", data=b"PWNED"))) == [errno.ENOENT]
        assert h3.stop() == 0
    finally:
        os.removexattr(env.outside, GFID_XATTR)
    env.assert_outside_unchanged()


# -- 3. tampered .georep ---------------------------------------------------------------------

def _outside_fake_meta(env: Env) -> Path:
    fake = env.outside / "fake-georep"
    for sub in ("gfid", "limbo"):
        (fake / sub).mkdir(parents=True)
    (fake / "orphans").write_bytes(b"")
    env.before = snapshot(env.tmp, env.exclude)
    return fake


@pytest.mark.parametrize("what", [".georep", ".georep/gfid", ".georep/limbo",
                                  ".georep/orphans", "orphans-hardlink"])
def test_tampered_meta_dir_before_start(env: Env, what: str) -> None:
    fake = _outside_fake_meta(env)
    h = env.start()  # lays out .georep
    assert h.stop() == 0
    if what == "orphans-hardlink":
        (env.root / ".georep" / "orphans").unlink()
        os.link(env.outside / "x", env.root / ".georep" / "orphans")
    else:
        p = env.root / what
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        os.symlink(str(fake / Path(what).name) if what != ".georep" else str(fake), p)
    lines: list[bytes] = []
    proc, chan = spawn_local([sys.executable, NODE, "secondary", "--root", str(env.root)],
                             stderr_handler=lines.append, cwd=str(env.cwd))
    with pytest.raises(RemoteError, match=r"\.georep|orphans"):
        chan.handshake(timeout=30)
    chan.close()
    assert proc.wait(30) == 2
    assert b"Traceback" not in b"\n".join(lines)
    env.assert_outside_unchanged()


def test_tampered_index_fanout_dir(env: Env) -> None:
    fake = _outside_fake_meta(env)
    h = env.start()
    A = G(0xAB)
    # the index bucket of A (first hex digits of the gfid) is a symlink to outside
    os.symlink(str(fake / "gfid"), env.root / ".georep" / "gfid" / A.hex()[:BUCKET_CHARS])
    same_bucket = A[:2] + uuid.uuid4().bytes[2:]
    res = h.ops(ensure(R, b"a", A, "f", data=b"PWNED"), ensure(R, b"d", same_bucket, "d"),
                meta_op(A, mode=0o777))
    assert set(errors(res)) <= {errno.ELOOP, errno.ENOTDIR} and len(errors(res)) == 3
    h.fails("data_write", {"gfid": A, "offset": 0}, b"PWNED")
    h.fails("stat_gfid", {"gfid": A})
    assert h.stop() == 0
    env.assert_outside_unchanged()


def test_meta_dir_swapped_while_running(env: Env) -> None:
    """The host holds fds: a .georep swapped for a symlink later is never used."""
    fake = _outside_fake_meta(env)
    h = env.start()
    D = G()
    assert h.statuses(ensure(R, b"d", D, "d")) == ["created"]
    os.rename(env.root / ".georep", env.root / "georep.old")
    os.symlink(str(fake), env.root / ".georep")
    assert h.statuses(ensure(D, b"f", G(), "f", data=b"x"), delete(R, b"d", D)) \
        == ["created", "deleted"]
    assert h.call("end_crawl")["purged"] >= 1
    assert h.stop() == 0
    env.assert_outside_unchanged()


# -- 4. the root renamed while the host runs ---------------------------------------------------

def test_root_renamed_while_running(env: Env) -> None:
    h = env.start()
    D, F = G(), G()
    assert h.statuses(ensure(R, b"d", D, "d")) == ["created"]
    os.rename(env.root, env.tmp / "sec2")
    # A symlink where the root was: the host works on fds and never looks at the path.
    os.symlink(str(env.outside), env.root)
    assert h.statuses(ensure(D, b"f", F, "f", data=b"x"), ensure(R, b"g", G(), "f")) \
        == ["created", "created"]
    assert h.call("data_write", {"gfid": F, "offset": 0}, b"data") == 4
    h.call("data_finish", {"gfid": F, "size": 4, "meta": {"mode": 0o600}})
    assert (env.tmp / "sec2" / "d" / "f").read_bytes() == b"data"
    assert (env.tmp / "sec2" / "g").exists()
    assert [e[0] for e in h.call("list_dir", {"gfid": R})["entries"]] == [b"d", b"g"]
    h.call("commit")
    assert h.stop() == 0
    env.root.unlink()
    env.assert_outside_unchanged()


# -- 5. absurd sizes and offsets; data to non-files ---------------------------------------------

def test_absurd_data_requests(env: Env) -> None:
    h = env.start()
    F, D, P = G(), G(), G()
    assert h.statuses(ensure(R, b"f", F, "f", data=b"0123456789"), ensure(R, b"d", D, "d"),
                      ensure(R, b"p", P, "p")) == ["created"] * 3
    big = 2**62
    for method, args, payload in [
        ("data_write", {"gfid": F, "offset": big}, b"x"),
        ("data_hole", {"gfid": F, "offset": big, "length": big}, None),
        ("data_hole", {"gfid": F, "offset": 2**63 - 1, "length": 2**63 - 1}, None),
        ("data_finish", {"gfid": F, "size": big, "meta": {}}, None),
        ("data_finish", {"gfid": F, "size": 2**63 - 1, "meta": {}}, None),
    ]:
        e = h.fails(method, args, payload, exc=OSError)
        assert isinstance(e, OSError) and e.errno in (errno.EFBIG, errno.EINVAL), e
    # Signatures: huge ranges are clipped to the file; absurd blocks are refused up front.
    assert h.call("data_sigs", {"gfid": F, "offset": big, "length": 4096, "block": 1})["sigs"] \
        == b""
    assert len(h.call("data_sigs", {"gfid": F, "offset": 0, "length": 1 << 19,
                                    "block": 1})["sigs"]) == 160
    assert len(h.call("data_sigs", {"gfid": F, "offset": 0, "length": 1 << 30,
                                    "block": 8 << 20})["sigs"]) == 16
    # A block too big to buffer (was a MemoryError and a traceback) or too many blocks.
    for block, length in ((0, 10), (big, 10), (2**63 - 1, 10), ((8 << 20) + 1, 10),
                          (1, big), (1, (1 << 19) + 1), (4096, 2**63 - 1)):
        h.fails("data_sigs", {"gfid": F, "offset": 0, "length": length, "block": block},
                exc=SchemaError)
    # Data requests for a directory or a fifo gfid: no such file.
    for g in (D, P, R, LIMBO_GFID, b"\0" * 16):
        for method, args, payload in [("data_write", {"gfid": g, "offset": 0}, b"x"),
                                      ("data_sigs", {"gfid": g, "offset": 0, "length": 1,
                                                     "block": 1}, None),
                                      ("data_finish", {"gfid": g, "size": 0, "meta": {}},
                                       None)]:
            h.fails(method, args, payload, exc=NotFound)
    # Payload larger than allowed: the client refuses to send it.
    with pytest.raises(RemoteError, match="exceeds the limit"):
        h.call("data_write", {"gfid": F, "offset": 0}, bytes(MAX_PAYLOAD + 1))
    assert (env.root / "f").read_bytes() == b"0123456789"
    assert h.stop() == 0
    env.assert_outside_unchanged()


# -- 6. names --------------------------------------------------------------------------------

def test_non_utf8_names_work(env: Env) -> None:
    h = env.start()
    D, F, L = G(), G(), G()
    dname, fname = b"caf\xe9\xff", b"\x80\xfe name \xc3"
    assert h.statuses(ensure(R, dname, D, "d"),
                      ensure(D, fname, F, "f", data=b"x",
                             meta={"xattrs": {b"user.\xff": b"\xfe"}, "mode": 0o640}),
                      ensure(D, b"l\xff", L, "l", target=b"t\xff\xfe/\x80")) \
        == ["created"] * 3
    assert (env.root / os.fsdecode(dname) / os.fsdecode(fname)).read_bytes() == b"x"
    assert h.call("data_write", {"gfid": F, "offset": 1}, b"yz") == 2
    entries = h.call("list_dir", {"gfid": D})["entries"]
    assert sorted(e[0] for e in entries) == [b"l\xff", fname]
    assert h.statuses(rename(F, D, fname, R, b"\xff" * 255, "f")) == ["renamed"]
    # Errors about such names are still one clean line.
    res = h.ops(ensure(G(), b"\xff\xfe", G(), "f"))
    assert res[0]["s"] == "error" and "\\xff" in res[0]["message"]
    assert h.statuses(delete(R, b"\xff" * 255, F), delete(R, dname, D)) == ["deleted"] * 2
    assert h.stop() == 0
    env.assert_outside_unchanged()


@pytest.mark.parametrize("name", [b"..", b".", b"a/b", b"/", b"\0", b"a\0b", b"x" * 256, b"",
                                  "str-name", 7])
def test_invalid_names_rejected(env: Env, name: Any) -> None:
    h = env.start()
    D = G()
    assert h.statuses(ensure(R, b"d", D, "d")) == ["created"]
    for op in (ensure(R, name, G(), "f"), ensure(D, name, G(), "d"), delete(D, name, D),
               rename(D, R, b"d", R, name, "d"), rename(D, R, name, R, b"d2", "d")):
        with pytest.raises(SchemaError, match="name"):
            h.call("ops", {"ops": [ensure(R, b"ok", G(), "f"), op]})
    assert not (env.root / "ok").exists(), "a batch with a bad op is rejected as a whole"
    assert h.stop() == 0
    env.assert_outside_unchanged()


def test_meta_dir_name_reserved_at_root(env: Env) -> None:
    h = env.start()
    D, F = G(), G()
    res = h.ops(ensure(R, b".georep", G(), "d"), ensure(R, b".georep", G(), "f"),
                delete(R, b".georep", G()), ensure(R, b"d", D, "d"),
                ensure(R, b"f", F, "f"),
                rename(D, R, b"d", R, b".georep", "d"), rename(F, R, b".georep", R, b"g", "f"))
    assert [r["s"] for r in res] == ["error", "error", "error", "created", "created",
                                     "error", "error"]
    assert errors(res) == [errno.EPERM] * 5
    # Inside a subdirectory the name is an ordinary one.
    assert h.statuses(ensure(D, b".georep", G(), "d")) == ["created"]
    names = [e[0] for e in h.call("list_dir", {"gfid": R})["entries"]]
    assert b".georep" not in names
    assert (env.root / ".georep" / "gfid").is_dir()
    assert h.stop() == 0
    env.assert_outside_unchanged()


# -- 7. malformed frames, straight to stdin -----------------------------------------------------

class RawHost:
    """The host with hand-written frames on its stdin (no Channel in between)."""

    def __init__(self, env: Env) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, NODE, "secondary", "--root", str(env.root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=str(env.cwd))
        assert self.proc.stdin and self.proc.stdout
        assert self.proc.stdout.read(len(MAGIC)) == MAGIC
        self.reader = FrameReader(self.proc.stdout)
        self.ids = 0
        assert "r" in self.request("hello", {"version": "x", "protocol": 1})

    def send(self, raw: bytes) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(raw)
        self.proc.stdin.flush()

    def frame(self, body: Any, payload: bytes = b"") -> bytes:
        packed = msgpack.packb(body, use_bin_type=True)
        return HEADER.pack(b"GR", 0, len(packed), len(payload)) + packed + payload

    def request(self, method: Any, args: Any, payload: bytes = b"", **extra: Any) -> dict:
        self.ids += 1
        self.send(self.frame({"t": "q", "id": self.ids, "m": method, "a": args, **extra},
                             payload))
        got = self.reader.read()
        assert got is not None, "the host hung up instead of replying"
        body, _ = got
        assert body["id"] == self.ids
        return body

    def ping_ok(self) -> None:
        assert self.request("ping", {}) == {"t": "r", "id": self.ids, "r": None}

    def dies(self) -> str:
        """After a fatal frame: EOF on stdout, exit 2, exactly one line on stderr."""
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        assert self.proc.stdout.read() == b""
        rc = self.proc.wait(30)
        err = self.proc.stderr.read().decode(errors="replace")
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    def close_ok(self) -> None:
        assert self.proc.stdin and self.proc.stderr
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0
        err = self.proc.stderr.read()
        assert b"Traceback" not in err, err


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


GOOD_GFID = b"\1" * 16


@pytest.mark.parametrize("args,why", [
    ({"gfid": GOOD_GFID, "offset": -1}, "offset"),                    # negative
    ({"gfid": GOOD_GFID, "offset": 2**64 - 1}, "offset"),             # uint64 max
    ({"gfid": GOOD_GFID, "offset": 1.5}, "offset"),                   # float
    ({"gfid": GOOD_GFID, "offset": True}, "offset"),                  # bool
    ({"gfid": "0" * 16, "offset": 0}, "gfid"),                        # str, not bin
    ({"gfid": GOOD_GFID[:15], "offset": 0}, "gfid"),
    ({"gfid": GOOD_GFID, "offset": 0, "extra": 1}, "unknown field"),
    ({"gfid": GOOD_GFID}, "missing"),
    ({1: 2}, "unknown field"),
    ([GOOD_GFID, 0], "arguments must be a map"),
    (None, "arguments must be a map"),
])
def test_schema_errors_keep_the_stream_in_sync(env: Env, args: Any, why: str) -> None:
    h = RawHost(env)
    body = h.request("data_write", args, b"payload bytes")
    assert body["e"]["type"] == "SchemaError" and why in body["e"]["message"], body
    h.ping_ok()
    h.close_ok()
    env.assert_outside_unchanged()


@pytest.mark.parametrize("method,args,payload,why", [
    ("no_such_method", {}, b"", "unknown method"),
    ("", {}, b"", "unknown method"),
    ("ping", {}, b"a payload", "takes no payload"),
    ("ops", {"ops": [{"op": "ensure"}]}, b"", "op 0"),
    ("ops", {"ops": [1, 2]}, b"", "op 0"),
    ("ops", {"ops": [ensure(R, b"a", GOOD_GFID, "f", data=b"x", target=b"t")]}, b"",
     "target"),
    ("ops", {"ops": [ensure(R, b"a", GOOD_GFID, "f", meta={"mode": -1})]}, b"", "mode"),
    ("ops", {"ops": [ensure(R, b"a", GOOD_GFID, "f", meta={"uid": 2**40})]}, b"", "uid"),
    ("ops", {"ops": [ensure(R, b"a", GOOD_GFID, "c", rdev=-5)]}, b"", "rdev"),
    ("ops", {"ops": [ensure(R, b"a", GOOD_GFID, "x")]}, b"", "type"),
    ("ops", {"ops": [meta_op(GOOD_GFID, xattrs={b"": b"v"})]}, b"", "xattr"),
    ("lookup", {"gfids": [GOOD_GFID] * 100_001}, b"", "more than"),
    ("list_dir", {"gfid": _deep(10)}, b"", "gfid"),
])
def test_bad_requests_get_error_replies(env: Env, method: str, args: Any, payload: bytes,
                                        why: str) -> None:
    h = RawHost(env)
    body = h.request(method, args, payload)
    assert "e" in body and why in body["e"]["message"], body
    assert "\n" not in body["e"]["message"]
    h.ping_ok()
    h.close_ok()
    assert list(env.root.iterdir()) == [env.root / ".georep"]
    env.assert_outside_unchanged()


def test_hello_again_is_an_error_reply(env: Env) -> None:
    h = RawHost(env)
    body = h.request("hello", {"version": "x", "protocol": 1})
    assert "e" in body and "hello" in body["e"]["message"]
    h.ping_ok()
    h.close_ok()


def _packed(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _framed(packed: bytes, plen: int = 0, magic: bytes = b"GR", flags: int = 0) -> bytes:
    return HEADER.pack(magic, flags, len(packed), plen) + packed


PING = {"t": "q", "id": 99, "m": "ping", "a": {}}

FATAL = {
    "bad magic": (b"XX" + _framed(_packed(PING))[2:], "bad frame magic"),
    "http": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad frame magic"),
    "flags": (_framed(_packed(PING), flags=1), "flags"),
    "huge body length": (HEADER.pack(b"GR", 0, 2**32 - 1, 0), "exceeds the limit"),
    "body just over": (HEADER.pack(b"GR", 0, MAX_BODY + 1, 0), "exceeds the limit"),
    "huge payload length": (HEADER.pack(b"GR", 0, 10, 2**32 - 1), "exceeds the limit"),
    "payload just over": (HEADER.pack(b"GR", 0, 10, MAX_PAYLOAD + 1), "exceeds the limit"),
    "truncated header": (b"GR\0\0\0", "middle of a frame"),
    "truncated body": (HEADER.pack(b"GR", 0, 100, 0) + b"\x80" * 10, "middle of a frame"),
    "truncated payload": (_framed(_packed(PING), plen=50) + b"x", "middle of a frame"),
    "non-map body": (_framed(_packed([1, 2, 3])), "not a map"),
    "nil body": (_framed(_packed(None)), "not a map"),
    "empty body": (_framed(b""), "undecodable"),
    "garbage body": (_framed(b"\xc1\xc1\xc1"), "undecodable"),
    "trailing bytes": (_framed(_packed(PING) + b"\x00"), "undecodable"),
    "deep nesting": (_framed(_packed({**PING, "a": {"x": _deep(30)}})), "deeper"),
    "very deep nesting": (_framed(b"\x91" * 200_000 + b"\xc0"), "undecodable"),
    "ext type": (_framed(_packed({**PING, "a": msgpack.ExtType(1, b"x")})), "undecodable"),
    "bad utf-8 str": (_framed(b"\x81\xa1t\xa2\xff\xfe"), "undecodable"),
    "str too long": (_framed(_packed({**PING, "a": {"x": "y" * 70_000}})), "undecodable"),
    "map too long": (_framed(b"\xdf\xff\xff\xff\xff"), "undecodable"),
    "extra envelope field": (_framed(_packed({**PING, "x": 1})), "malformed request"),
    "missing id": (_framed(_packed({"t": "q", "m": "ping", "a": {}})), "malformed request"),
    "string id": (_framed(_packed({**PING, "id": "1"})), "malformed request"),
    "negative id": (_framed(_packed({**PING, "id": -1})), "malformed request"),
    "reply not request": (_framed(_packed({"t": "r", "id": 1, "r": None})),
                          "malformed request"),
    "method not str": (_framed(_packed({**PING, "m": b"ping"})), "malformed request"),
}


@pytest.mark.parametrize("case", sorted(FATAL))
def test_fatal_frames_exit_with_one_line(env: Env, case: str) -> None:
    raw, why = FATAL[case]
    h = RawHost(env)
    h.ping_ok()
    h.send(raw)
    line = h.dies()
    assert line.startswith("georep secondary: ") and why in line, line
    assert len(line) < 1000
    env.assert_outside_unchanged()


def test_split_writes_and_pipelining_stay_in_sync(env: Env) -> None:
    """Frames cut at every byte and glued together are read exactly as sent."""
    h = RawHost(env)
    frames = b"".join(_framed(_packed({**PING, "id": i})) for i in range(1, 40))
    for i in range(len(frames)):
        h.send(frames[i:i + 1])
    for i in range(1, 40):
        got = h.reader.read()
        assert got is not None and got[0] == {"t": "r", "id": i, "r": None}
    h.close_ok()


def test_request_before_hello_is_refused(env: Env) -> None:
    proc = subprocess.Popen([sys.executable, NODE, "secondary", "--root", str(env.root)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(env.cwd))
    assert proc.stdout and proc.stdin
    assert proc.stdout.read(len(MAGIC)) == MAGIC
    proc.stdin.write(b"".join(encode_frame(
        {"t": "q", "id": 1, "m": "ops", "a": {"ops": [ensure(R, b"a", G(), "f")]}})))
    proc.stdin.flush()
    got = FrameReader(proc.stdout).read()
    assert got is not None and "hello" in got[0]["e"]["message"]
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and b"Traceback" not in err
    assert not (env.root / "a").exists()


def test_channel_rejects_a_hostile_secondary(tmp_path: Path) -> None:
    """The other direction: a 'secondary' that sends junk is a lost connection, not a hang."""
    script = ("import os,sys; os.write(1, b'GEOREP-SECONDARY');"
              "sys.stdin.buffer.read(1); os.write(1, b'GR\\0\\0\\xff\\xff\\xff\\xff\\0\\0\\0\\0')")
    proc, chan = spawn_local([sys.executable, "-c", script], stderr_handler=lambda _: None)
    assert isinstance(chan, Channel)
    with pytest.raises(RemoteError, match=r"exceeds the limit|closed the connection"):
        chan.handshake(timeout=30)
    chan.close()
    proc.wait(30)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "hardlink"])
def test_tampered_session_lock_file(env: Env, kind: str) -> None:
    """``.georep/lock`` gets the lock record written into it: never through a link."""
    h = env.start()
    assert h.stop() == 0
    lock = env.root / ".georep" / "lock"
    lock.unlink()
    if kind == "symlink":
        os.symlink(str(env.outside / "x"), lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        os.link(env.outside / "x", lock)
    lines: list[bytes] = []
    proc, chan = spawn_local([sys.executable, NODE, "secondary", "--root", str(env.root)],
                             stderr_handler=lines.append, cwd=str(env.cwd))
    try:
        chan.handshake(timeout=30)
    except RemoteError:
        pass
    chan.close()
    proc.wait(30)
    assert b"Traceback" not in b"\n".join(lines)
    env.assert_outside_unchanged()
