"""SecondaryFS on real files in tmp_path: identity, idempotence, containment."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from fsops import xattrs
from fsops.constants import GFID_XATTR, LIMBO_GFID, ROOT_GFID, is_root
from fsops.secondary import NotFound, SecondaryError, SecondaryFS
from fsops.secondary_index import BUCKET_CHARS, hexname

R = ROOT_GFID
T0 = 1_600_000_000_123_456_789
T1 = 1_650_000_000_987_654_321


def G() -> bytes:
    return uuid.uuid4().bytes


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "sec"


@pytest.fixture
def fs(root: Path):
    s = SecondaryFS(bytes(root), create=True)
    yield s
    s.close()


def ok(results: list[dict]) -> list[str]:
    for r in results:
        assert r["s"] != "error", r
    return [r["s"] for r in results]


def ensure(pgfid, name, gfid, type_, **kw) -> dict:
    return {"op": "ensure", "pgfid": pgfid, "name": name, "gfid": gfid, "type": type_, **kw}


def gfid_of(path: Path) -> bytes | None:
    return xattrs.get(os.fsencode(path), GFID_XATTR)


def index_path(root: Path, gfid: bytes) -> Path:
    h = hexname(gfid).decode()
    return root / ".georep" / "gfid" / h[:BUCKET_CHARS] / h


def meta(mode=0o644, uid=0, gid=0, atime=T0, mtime=T1, **kw) -> dict:
    return {"mode": mode, "uid": uid, "gid": gid, "atime": atime, "mtime": mtime, **kw}


# -- setup ------------------------------------------------------------------------------

def test_layout_and_root_gfid(fs: SecondaryFS, root: Path) -> None:
    for sub in ("", "gfid", "limbo"):
        assert stat.S_IMODE((root / ".georep" / sub).stat().st_mode) == 0o700
    assert (root / ".georep" / "orphans").is_file()
    assert gfid_of(root) == ROOT_GFID
    fs.commit()


def test_init_errors(tmp_path: Path) -> None:
    with pytest.raises(SecondaryError, match="does not exist"):
        SecondaryFS(bytes(tmp_path / "missing"))
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(SecondaryError, match="not a directory"):
        SecondaryFS(bytes(tmp_path / "file"))
    # Reopening an existing secondary works and keeps its state.
    SecondaryFS(bytes(tmp_path / "s"), create=True).close()
    with SecondaryFS(bytes(tmp_path / "s")) as s:
        assert s.list_dir(R) == []


def test_index_layout_is_recorded_and_older_secondaries_keep_theirs(tmp_path: Path) -> None:
    g = bytes.fromhex("abcdef0123456789abcdef0123456789")
    # A new secondary: 256 buckets, recorded in .georep/layout.
    new = tmp_path / "new"
    with SecondaryFS(bytes(new), create=True) as s:
        ok(s.apply_ops([ensure(R, b"f", g, "f", data=b"x")]))
    assert (new / ".georep" / "layout").read_bytes() == b"gfid-bucket-chars 2\n"
    assert (new / ".georep" / "gfid" / "ab" / g.hex()).stat().st_ino == \
        (new / "f").stat().st_ino
    # An index made before the layout file (4,096 buckets of 3 hex digits) keeps them.
    old = tmp_path / "old"
    (old / ".georep" / "gfid" / "012").mkdir(parents=True)
    with SecondaryFS(bytes(old), create=True) as s:
        ok(s.apply_ops([ensure(R, b"f", g, "f", data=b"x")]))
        assert s.list_dir(R)[0][:2] == [b"f", g]
    assert (old / ".georep" / "layout").read_bytes() == b"gfid-bucket-chars 3\n"
    assert (old / ".georep" / "gfid" / "abc" / g.hex()).exists()
    # A layout that is not one of ours (or a fifo: never waited on) refuses the root.
    (old / ".georep" / "layout").write_bytes(b"gfid-bucket-chars 9\n")
    with pytest.raises(SecondaryError, match="unknown index layout"):
        SecondaryFS(bytes(old))
    (old / ".georep" / "layout").unlink()
    os.mkfifo(old / ".georep" / "layout")
    with pytest.raises(SecondaryError):
        SecondaryFS(bytes(old))


# -- creation of each type, with meta ---------------------------------------------------

def test_file_with_data_and_full_meta(fs: SecondaryFS, root: Path, tmp_path: Path) -> None:
    acl_src = tmp_path / "aclsrc"
    acl_src.write_bytes(b"")
    subprocess.run(["setfacl", "-m", "u:1234:rx", str(acl_src)], check=True)
    acl = xattrs.get(os.fsencode(acl_src), xattrs.ACL_ACCESS)
    assert acl
    g = G()
    # A mode consistent with the ACL, as on a primary (chmod rewrites the ACL's entries).
    mode = stat.S_IMODE(acl_src.stat().st_mode) | stat.S_ISUID
    m = meta(mode=mode, uid=1234, gid=1234,
             xattrs={b"user.colour": b"blue", xattrs.ACL_ACCESS: acl})
    op = ensure(R, b"f", g, "f", data=b"hello", meta=m)
    assert ok(fs.apply_ops([op])) == ["created"]
    p = root / "f"
    st = p.lstat()
    assert p.read_bytes() == b"hello"
    assert stat.S_IMODE(st.st_mode) == mode
    assert (st.st_uid, st.st_gid) == (1234, 1234)
    assert (st.st_atime_ns, st.st_mtime_ns) == (T0, T1)
    assert xattrs.read_replicated(os.fsencode(p)) == m["xattrs"]
    assert gfid_of(p) == g
    assert index_path(root, g).lstat().st_ino == st.st_ino
    assert ok(fs.apply_ops([op])) == ["kept"]
    assert p.lstat().st_ino == st.st_ino
    assert (p.lstat().st_mtime_ns, p.read_bytes()) == (T1, b"hello")
    # xattrs are applied exactly: a dropped one disappears.
    m2 = dict(m, xattrs={b"user.colour": b"red"})
    ok(fs.apply_ops([{"op": "meta", "gfid": g, "meta": m2}]))
    assert xattrs.read_replicated(os.fsencode(p)) == {b"user.colour": b"red"}
    assert stat.S_IMODE(p.lstat().st_mode) == mode


def test_kept_file_rewrites_only_changed_data(fs: SecondaryFS, root: Path) -> None:
    g = G()
    ok(fs.apply_ops([ensure(R, b"f", g, "f", data=b"one")]))
    ino = (root / "f").lstat().st_ino
    assert ok(fs.apply_ops([ensure(R, b"f", g, "f", data=b"two!!")])) == ["kept"]
    assert (root / "f").read_bytes() == b"two!!"
    assert ok(fs.apply_ops([ensure(R, b"f", g, "f", data=b"")])) == ["kept"]
    assert (root / "f").read_bytes() == b""
    assert (root / "f").lstat().st_ino == ino


def test_dir_with_special_mode_bits(fs: SecondaryFS, root: Path) -> None:
    g = G()
    op = ensure(R, b"d", g, "d", meta=meta(mode=0o3775, uid=1234, gid=99,
                                           xattrs={b"user.k": b"v"}))
    assert ok(fs.apply_ops([op, op])) == ["created", "kept"]
    st = (root / "d").lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o3775
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1234, 99, T1)
    assert os.readlink(index_path(root, g)) == R.hex() + "/d"
    assert fs.stat_gfid(g)[:3] == ["d", 0o3775, 1234]


@pytest.mark.parametrize("target", [b"/etc/passwd", b"nowhere/at/all", b"../../../../etc"])
def test_symlinks(fs: SecondaryFS, root: Path, target: bytes) -> None:
    g = G()
    op = ensure(R, b"l", g, "l", target=target, meta=meta(uid=1234, gid=1234))
    assert ok(fs.apply_ops([op, op])) == ["created", "kept"]
    p = root / "l"
    assert os.readlink(os.fsencode(p)) == target
    st = p.lstat()
    assert (st.st_uid, st.st_mtime_ns) == (1234, T1)
    assert fs.stat_gfid(g)[0] == "l"
    # A different target for the same name is a different object.
    g2 = G()
    assert ok(fs.apply_ops([ensure(R, b"l", g2, "l", target=b"other")])) == ["created"]
    assert os.readlink(os.fsencode(p)) == b"other"


def test_fifo_socket_and_devices(fs: SecondaryFS, root: Path) -> None:
    gp, gs = G(), G()
    ops = [ensure(R, b"p", gp, "p", meta=meta(mode=0o640)),
           ensure(R, b"s", gs, "s", meta=meta(mode=0o600))]
    assert ok(fs.apply_ops(ops + ops)) == ["created"] * 2 + ["kept"] * 2
    assert stat.S_ISFIFO((root / "p").lstat().st_mode)
    assert stat.S_IMODE((root / "p").lstat().st_mode) == 0o640
    assert stat.S_ISSOCK((root / "s").lstat().st_mode)
    assert fs.stat_gfid(gp)[0] == "p"
    if is_root():
        gc = G()
        dev = os.makedev(1, 3)
        op = ensure(R, b"null", gc, "c", rdev=dev, meta=meta(mode=0o666))
        assert ok(fs.apply_ops([op, op])) == ["created", "kept"]
        st = (root / "null").lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == dev


# -- identity across renames, links, swaps ----------------------------------------------

def test_rename_file_across_dirs_keeps_inode(fs: SecondaryFS, root: Path) -> None:
    d1, d2, f = G(), G(), G()
    ok(fs.apply_ops([ensure(R, b"d1", d1, "d"), ensure(R, b"d2", d2, "d"),
                     ensure(d1, b"a", f, "f", data=b"x")]))
    ino = (root / "d1" / "a").lstat().st_ino
    op = {"op": "rename", "gfid": f, "pgfid": d1, "name": b"a", "npgfid": d2,
          "nname": b"b", "type": "f"}
    assert ok(fs.apply_ops([op, op])) == ["renamed", "kept"]
    assert not (root / "d1" / "a").exists()
    assert (root / "d2" / "b").lstat().st_ino == ino


def test_rename_via_ensure_keeps_dir_inode_and_children(fs: SecondaryFS, root: Path) -> None:
    d, sub, f = G(), G(), G()
    ok(fs.apply_ops([ensure(R, b"old", d, "d"), ensure(d, b"sub", sub, "d"),
                     ensure(sub, b"f", f, "f", data=b"data")]))
    ino = (root / "old").lstat().st_ino
    op = ensure(R, b"new", d, "d")
    assert ok(fs.apply_ops([op, op])) == ["renamed", "kept"]
    assert not (root / "old").exists()
    assert (root / "new").lstat().st_ino == ino
    assert [e[0] for e in fs.list_dir(sub)] == [b"f"]
    with os.fdopen(fs.open_data(f), "rb") as fh:
        assert fh.read() == b"data"
    # A fresh instance (no fd cache) resolves the moved chain from the index alone.
    fs.close()
    with SecondaryFS(bytes(root)) as s2:
        assert [e[1] for e in s2.list_dir(sub)] == [f]


def test_parent_times_restored_after_rename(fs: SecondaryFS, root: Path) -> None:
    d1, d2, f = G(), G(), G()
    ok(fs.apply_ops([ensure(R, b"d1", d1, "d"), ensure(R, b"d2", d2, "d"),
                     ensure(d1, b"a", f, "f")]))
    ok(fs.apply_ops([{"op": "meta", "gfid": d, "meta": meta(mode=0o755)} for d in (d1, d2)]))
    ok(fs.apply_ops([ensure(d2, b"a", f, "f")]))  # linked
    ok(fs.apply_ops([{"op": "rename", "gfid": f, "pgfid": d1, "name": b"a", "npgfid": d2,
                      "nname": b"b", "type": "f"}]))
    for d in ("d1", "d2"):
        st = (root / d).lstat()
        assert (st.st_atime_ns, st.st_mtime_ns) == (T0, T1)


def test_swap_files_via_ensure(fs: SecondaryFS, root: Path) -> None:
    ga, gb = G(), G()
    ok(fs.apply_ops([ensure(R, b"a", ga, "f", data=b"A"), ensure(R, b"b", gb, "f", data=b"B")]))
    ia, ib = (root / "a").lstat().st_ino, (root / "b").lstat().st_ino
    ok(fs.apply_ops([ensure(R, b"a", gb, "f"), ensure(R, b"b", ga, "f")]))
    assert (root / "a").lstat().st_ino == ib and (root / "a").read_bytes() == b"B"
    assert (root / "b").lstat().st_ino == ia and (root / "b").read_bytes() == b"A"
    assert fs.end_crawl() == 0
    assert sorted(p.name for p in root.iterdir()) == [".georep", "a", "b"]


def test_swap_dirs_via_ensure(fs: SecondaryFS, root: Path) -> None:
    ga, gb, fa = G(), G(), G()
    ok(fs.apply_ops([ensure(R, b"a", ga, "d"), ensure(R, b"b", gb, "d"),
                     ensure(ga, b"child", fa, "f", data=b"c")]))
    ia, ib = (root / "a").lstat().st_ino, (root / "b").lstat().st_ino
    assert ok(fs.apply_ops([ensure(R, b"a", gb, "d"), ensure(R, b"b", ga, "d")])) \
        == ["renamed", "renamed"]
    assert (root / "a").lstat().st_ino == ib
    assert (root / "b").lstat().st_ino == ia
    assert (root / "b" / "child").read_bytes() == b"c"
    fs.end_crawl()
    assert fs.stat_gfid(ga) is not None and fs.stat_gfid(fa) is not None
    assert list((root / ".georep" / "limbo").iterdir()) == []


def test_file_replaced_by_dir_and_back(fs: SecondaryFS, root: Path) -> None:
    gf, gd, gf2 = G(), G(), G()
    ok(fs.apply_ops([ensure(R, b"x", gf, "f", data=b"f")]))
    assert ok(fs.apply_ops([ensure(R, b"x", gd, "d")])) == ["created"]
    assert (root / "x").is_dir()
    assert ok(fs.apply_ops([ensure(R, b"x", gf2, "f", data=b"g")])) == ["created"]
    assert (root / "x").read_bytes() == b"g"
    assert len(list((root / ".georep" / "limbo").iterdir())) == 1
    # The evicted file is still reachable by gfid until the crawl ends.
    assert fs.stat_gfid(gf) is not None
    assert ok(fs.apply_ops([ensure(R, b"y", gf, "f")])) == ["linked"]
    fs.end_crawl()
    assert (root / "y").read_bytes() == b"f"
    assert fs.stat_gfid(gd) is None
    assert not index_path(root, gd).exists()


def test_hardlink_ensure(fs: SecondaryFS, root: Path) -> None:
    g = G()
    ok(fs.apply_ops([ensure(R, b"one", g, "f", data=b"z")]))
    op = ensure(R, b"two", g, "f")
    assert ok(fs.apply_ops([op, op])) == ["linked", "kept"]
    assert (root / "one").lstat().st_ino == (root / "two").lstat().st_ino
    assert fs.stat_gfid(g)[-1] == 2  # the index link is not counted
    entries = {e[0]: e for e in fs.list_dir(R)}
    assert entries[b"one"][-1] == 2 and entries[b"one"][1] == g
    assert fs.link(R, b"three", g) == "linked"
    assert fs.link(R, b"three", g) == "kept"


def test_rename_semantics(fs: SecondaryFS, root: Path) -> None:
    a, b, other = G(), G(), G()
    ok(fs.apply_ops([ensure(R, b"a", a, "f", data=b"a"), ensure(R, b"o", other, "f")]))

    def ren(g, name, nname, t="f"):
        return {"op": "rename", "gfid": g, "pgfid": R, "name": name, "npgfid": R,
                "nname": nname, "type": t}

    # Over another gfid: that one is evicted, its index link keeps it until end_crawl.
    assert ok(fs.apply_ops([ren(a, b"a", b"o")])) == ["renamed"]
    assert gfid_of(root / "o") == a
    assert fs.stat_gfid(other) is not None
    # Neither source nor target hold it, but it is known: ensure at the target.
    assert ok(fs.apply_ops([ren(a, b"gone", b"again")])) == ["linked"]
    res = fs.apply_ops([ren(b, b"nope", b"zip")])
    assert res[0]["s"] == "error" and res[0]["errno"] == errno.ENOENT
    fs.end_crawl()
    assert fs.stat_gfid(other) is None
    # Directory rename updates the index symlink.
    d = G()
    ok(fs.apply_ops([ensure(R, b"d", d, "d")]))
    assert ok(fs.apply_ops([ren(d, b"d", b"e", "d")])) == ["renamed"]
    assert os.readlink(index_path(root, d)) == R.hex() + "/e"


# -- deletion, limbo, end_crawl ---------------------------------------------------------

def test_delete_dir_limbo_rescue_and_purge(fs: SecondaryFS, root: Path) -> None:
    top, keep, lost, f, lf = G(), G(), G(), G(), G()
    ok(fs.apply_ops([ensure(R, b"top", top, "d"), ensure(top, b"keep", keep, "d"),
                     ensure(keep, b"f", f, "f", data=b"1"), ensure(top, b"lost", lost, "d"),
                     ensure(lost, b"lf", lf, "f", data=b"2")]))
    ino = (root / "top" / "keep").lstat().st_ino
    op = {"op": "delete", "pgfid": R, "name": b"top", "gfid": top}
    assert ok(fs.apply_ops([op, op])) == ["deleted", "absent"]
    assert (root / ".georep" / "limbo" / hexname(top).decode()).is_dir()
    assert ok(fs.apply_ops([ensure(R, b"rescued", keep, "d")])) == ["renamed"]
    assert (root / "rescued").lstat().st_ino == ino
    assert fs.end_crawl() == 3  # top, lost and lf; keep and f were rescued
    assert list((root / ".georep" / "limbo").iterdir()) == []
    assert (root / "rescued" / "f").read_bytes() == b"1"
    for g in (top, lost, lf):
        assert fs.stat_gfid(g) is None
        assert not os.path.lexists(index_path(root, g))
    assert fs.stat_gfid(f) is not None
    assert fs.end_crawl() == 0


def test_delete_file_orphan_then_relinked(fs: SecondaryFS, root: Path) -> None:
    a, b = G(), G()
    ok(fs.apply_ops([ensure(R, b"a", a, "f", data=b"A"), ensure(R, b"b", b, "f")]))
    ops = [{"op": "delete", "pgfid": R, "name": b"a", "gfid": a},
           {"op": "delete", "pgfid": R, "name": b"b", "gfid": b}]
    assert ok(fs.apply_ops(ops + ops)) == ["deleted"] * 2 + ["absent"] * 2
    assert ok(fs.apply_ops([ensure(R, b"moved", a, "f")])) == ["linked"]
    assert fs.end_crawl() == 1
    assert (root / "moved").read_bytes() == b"A"
    assert index_path(root, a).exists() and not index_path(root, b).exists()
    assert (root / ".georep" / "orphans").stat().st_size == 0


def test_delete_other_gfid_left_alone(fs: SecondaryFS, root: Path) -> None:
    a = G()
    ok(fs.apply_ops([ensure(R, b"a", a, "f")]))
    assert ok(fs.apply_ops([{"op": "delete", "pgfid": R, "name": b"a", "gfid": G()}])) \
        == ["other"]
    assert (root / "a").exists()


def test_end_crawl_after_partial_state(fs: SecondaryFS, root: Path) -> None:
    limbo = root / ".georep" / "limbo"
    (limbo / "junk" / "deep").mkdir(parents=True)
    (limbo / "junk" / "deep" / "f").write_bytes(b"x")
    os.symlink("/", limbo / "junk" / "root-link")
    with open(root / ".georep" / "orphans", "ab") as fh:
        fh.write(G() + b"torn")
    assert fs.end_crawl() == 4
    assert list(limbo.iterdir()) == []
    assert Path("/").exists()


def test_primitives(fs: SecondaryFS, root: Path) -> None:
    d, sub, f, s, p = G(), G(), G(), G(), G()
    assert fs.mkdir(R, b"d", d) == "created"
    assert fs.mkdir(R, b"d", d) == "kept"
    assert fs.mkdir(d, b"sub", sub) == "created"
    assert fs.create(sub, b"f", f, data=b"q") == "created"
    assert fs.create(sub, b"f", f, data=b"q") == "kept"
    assert fs.symlink(d, b"s", s, b"target") == "created"
    assert fs.mknod(d, b"p", p, "p") == "created"
    assert fs.mknod(d, b"p", p, "p") == "kept"
    assert fs.unlink(d, b"s", s) == "deleted"
    assert fs.unlink(d, b"s", s) == "absent"
    with pytest.raises(IsADirectoryError):
        fs.unlink(R, b"d", d)
    assert fs.rmdir(d, b"sub", sub) == "deleted"  # non-empty: to limbo
    assert fs.rmdir(d, b"sub", sub) == "absent"
    assert fs.rename(p, d, b"p", R, b"p2", "p") == "renamed"
    assert fs.rename(p, d, b"p", R, b"p2", "p") == "kept"
    e = G()
    assert fs.mkdir(R, b"empty", e) == "created"
    assert fs.rmdir(R, b"empty", e) == "deleted"
    assert not os.path.lexists(index_path(root, e))
    fs.end_crawl()
    assert sorted(x.name for x in (root / "d").iterdir()) == []


# -- adoption ---------------------------------------------------------------------------

def test_adoption_of_preseeded_objects(root: Path) -> None:
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"same")
    (root / "dir" / "stale").write_bytes(b"old content")
    ino_d = (root / "dir").lstat().st_ino
    ino_f = (root / "dir" / "file").lstat().st_ino
    with SecondaryFS(bytes(root)) as fs:
        gd, gf, gs = G(), G(), G()
        assert ok(fs.apply_ops([ensure(R, b"dir", gd, "d"),
                                ensure(gd, b"file", gf, "f", data=b"same"),
                                ensure(gd, b"stale", gs, "f", data=b"new")])) \
            == ["adopted"] * 3
        assert (root / "dir").lstat().st_ino == ino_d
        assert (root / "dir" / "file").lstat().st_ino == ino_f
        assert (root / "dir" / "stale").read_bytes() == b"new"
        assert gfid_of(root / "dir" / "file") == gf
        assert fs.list_dir(gd)[0][:2] == [b"file", gf]
        # Same type, no gfid, but the gfid already lives elsewhere: that one is linked in.
        (root / "dir" / "dup").write_bytes(b"dup")
        assert ok(fs.apply_ops([ensure(gd, b"dup", gf, "f")])) == ["linked"]
        assert (root / "dir" / "dup").lstat().st_ino == ino_f


def test_list_dir_and_queries(fs: SecondaryFS, root: Path) -> None:
    d, f = G(), G()
    ok(fs.apply_ops([ensure(R, b"d", d, "d"), ensure(d, b"f", f, "f", data=b"12345",
                                                     meta=meta(mode=0o600))]))
    (root / "plain").write_bytes(b"")
    entries = fs.list_dir(R)
    assert [e[0] for e in entries] == [b"d", b"plain"]
    assert entries[0][1] == d and entries[0][2] == "d"
    assert entries[1][1] is None
    (fe,) = fs.list_dir(d)
    assert fe[:8] == [b"f", f, "f", 0o600, 0, 0, 5, T1]
    assert fe[9] == 1
    assert fs.stat_gfid(f)[:7] == ["f", 0o600, 0, 0, 5, T1, b""]
    assert fs.stat_gfid(G()) is None
    with pytest.raises(NotFound):
        fs.list_dir(G())
    with pytest.raises(NotFound):
        fs.open_data(d)
    fd = fs.open_data(f)
    try:
        os.pwrite(fd, b"XY", 0)
    finally:
        os.close(fd)
    assert (root / "d" / "f").read_bytes() == b"XY345"


def test_list_dir_heals_missing_index(fs: SecondaryFS, root: Path) -> None:
    d, f = G(), G()
    ok(fs.apply_ops([ensure(R, b"d", d, "d"), ensure(d, b"f", f, "f")]))
    os.unlink(index_path(root, f))
    os.unlink(index_path(root, d))
    fs.list_dir(R)
    fs.list_dir(d)
    assert os.readlink(index_path(root, d)) == R.hex() + "/d"
    assert index_path(root, f).lstat().st_ino == (root / "d" / "f").lstat().st_ino


# -- validation and errors --------------------------------------------------------------

@pytest.mark.parametrize(("name", "code"), [
    (b"..", errno.EINVAL), (b".", errno.EINVAL), (b"a/b", errno.EINVAL), (b"", errno.EINVAL),
    (b"x" * 256, errno.EINVAL), (b"a\0b", errno.EINVAL), ("str", errno.EINVAL),
    (b".georep", errno.EPERM)])
def test_name_validation(fs: SecondaryFS, name, code) -> None:
    g = G()
    res = fs.apply_ops([
        ensure(R, name, g, "f"),
        {"op": "delete", "pgfid": R, "name": name, "gfid": g},
        {"op": "rename", "gfid": g, "pgfid": R, "name": name, "npgfid": R, "nname": b"x",
         "type": "f"},
        {"op": "rename", "gfid": g, "pgfid": R, "name": b"x", "npgfid": R, "nname": name,
         "type": "f"},
    ])
    assert [r["errno"] for r in res] == [code] * 4, res
    assert res[0]["message"].startswith("ensure ")


def test_errors_are_values_and_batch_continues(fs: SecondaryFS, root: Path) -> None:
    g = G()
    res = fs.apply_ops([{"op": "meta", "gfid": G(), "meta": meta()},
                        ensure(G(), b"orphan", G(), "f"),
                        {"op": "bogus"},
                        {"op": "ensure"},
                        ensure(R, b"fine", g, "f"),
                        ensure(R, b"lim", G(), "f") | {"pgfid": LIMBO_GFID},
                        ensure(R, b"r", R, "d")])
    assert [r["s"] for r in res] == ["error"] * 4 + ["created", "error", "error"]
    assert res[0]["errno"] == errno.ENOENT
    assert res[1]["errno"] == errno.ENOENT and "orphan" in res[1]["message"]
    assert res[5]["errno"] == errno.EPERM
    assert res[6]["errno"] == errno.EINVAL


# -- containment: nothing outside the root is ever touched ------------------------------

@pytest.fixture
def canary(tmp_path: Path) -> Path:
    c = tmp_path / "canary"
    c.mkdir()
    (c / "file").write_bytes(b"canary")
    os.chmod(c, 0o755)
    os.chmod(c / "file", 0o644)
    return c


def snapshot(c: Path) -> list:
    return sorted((p.name, p.lstat().st_mode, p.lstat().st_mtime_ns, p.lstat().st_uid)
                  for p in [c, *c.iterdir()])


def test_symlink_to_outside_never_followed(fs: SecondaryFS, root: Path, canary: Path) -> None:
    before = snapshot(canary)
    os.symlink(canary, root / "evil")
    os.symlink(canary / "file", root / "evilf")
    gl = G()
    ok(fs.apply_ops([ensure(R, b"mine", gl, "l", target=bytes(canary),
                            meta=meta(mode=0o777, uid=1234, gid=1234))]))
    res = fs.apply_ops([
        {"op": "meta", "gfid": gl, "meta": meta(mode=0o700, uid=1234, gid=1234,
                                                  xattrs={b"trusted.x": b"1"})},
        ensure(R, b"evilf", G(), "f", data=b"overwritten?", meta=meta(mode=0o600)),
        ensure(R, b"evil", G(), "d", meta=meta(mode=0o700)),
        {"op": "delete", "pgfid": R, "name": b"mine", "gfid": gl},
    ])
    assert [r["s"] for r in res] == ["applied", "created", "created", "deleted"], res
    assert fs.list_dir(R)  # lists the (now replaced) names, not the canary
    fs.end_crawl()
    assert snapshot(canary) == before
    assert (canary / "file").read_bytes() == b"canary"
    assert xattrs.read_replicated(os.fsencode(canary)) == {}


def test_tampered_tree_and_index_rejected(root: Path, canary: Path) -> None:
    before = snapshot(canary)
    d = G()
    with SecondaryFS(bytes(root), create=True) as fs:
        ok(fs.apply_ops([ensure(R, b"d", d, "d")]))
    # Someone swaps the directory for a symlink to the canary.
    os.rename(root / "d", root / "d.real")
    os.symlink(canary, root / "d")
    with SecondaryFS(bytes(root)) as fs:
        res = fs.apply_ops([ensure(d, b"file", G(), "f", data=b"x"),
                            {"op": "meta", "gfid": d, "meta": meta(mode=0o777)}])
        assert [r["errno"] for r in res] == [errno.ENOENT] * 2
        with pytest.raises(NotFound):
            fs.list_dir(d)
    # And the index symlink is pointed at escapes of every kind.
    for target in (b"../../../../canary", b"../../../../../../../tmp",
                   R.hex().encode() + b"/.georep", R.hex().encode() + b"/d/..",
                   b"/" + bytes(canary), R.hex().encode() + b"/d"):
        ip = index_path(root, d)
        os.unlink(ip)
        os.symlink(target, ip)
        with SecondaryFS(bytes(root)) as fs:
            res = fs.apply_ops([ensure(d, b"file", G(), "f", data=b"x")])
            assert res[0]["errno"] == errno.ENOENT, (target, res)
            with pytest.raises(NotFound):
                fs.list_dir(d)
            assert fs.stat_gfid(d) is None
    assert snapshot(canary) == before


def test_meta_on_symlink_index_not_followed(fs: SecondaryFS, root: Path, canary: Path) -> None:
    before = snapshot(canary)
    g = G()
    ok(fs.apply_ops([ensure(R, b"l", g, "l", target=bytes(canary / "file"))]))
    ok(fs.apply_ops([{"op": "meta", "gfid": g, "meta": meta(mode=0o600, mtime=5)}]))
    assert (root / "l").lstat().st_mtime_ns == 5
    assert snapshot(canary) == before


def test_apply_meta_fd_symlink(fs: SecondaryFS, root: Path) -> None:
    g = G()
    ok(fs.apply_ops([ensure(R, b"l", g, "l", target=b"t")]))
    fd = os.open(root / "l", os.O_PATH | os.O_NOFOLLOW)
    try:
        fs.apply_meta_fd(fd, meta(uid=1234, gid=1234, mtime=77), is_symlink=True)
    finally:
        os.close(fd)
    st = (root / "l").lstat()
    assert (st.st_uid, st.st_mtime_ns) == (1234, 77)


def test_unknown_socket_type_in_tree_listed(fs: SecondaryFS, root: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "sock"))
    finally:
        s.close()
    (e,) = fs.list_dir(R)
    assert e[:3] == [b"sock", None, "s"]
    assert fs.list_dir(LIMBO_GFID) == []


def test_small_fd_cache_and_deep_tree(fs: SecondaryFS, root: Path) -> None:
    fs.index.dirs.capacity = 3
    chain = [R]
    ops = []
    for i in range(12):
        g = G()
        ops.append(ensure(chain[-1], b"d%d" % i, g, "d"))
        chain.append(g)
    wide = [G() for _ in range(10)]
    ops += [ensure(R, b"w%d" % i, g, "d") for i, g in enumerate(wide)]
    ok(fs.apply_ops(ops))
    for g in wide:
        os.unlink(index_path(root, g))
    assert [e[1] for e in fs.list_dir(R)][1:] == [wide[i] for i in sorted(
        range(10), key=lambda i: b"w%d" % i)]
    for g in chain[1:]:
        assert fs.stat_gfid(g) is not None
    assert ok(fs.apply_ops([ensure(chain[-1], b"leaf", G(), "f", data=b"deep")])) \
        == ["created"]
    assert (root.joinpath(*[f"d{i}" for i in range(12)]) / "leaf").read_bytes() == b"deep"


def test_resolution_without_openat2(root: Path, canary: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from fsops import resolve
    monkeypatch.setattr(resolve, "_have_openat2", False)  # the O_NOFOLLOW walk fallback
    a, b = G(), G()
    with SecondaryFS(bytes(root), create=True) as fs:
        ok(fs.apply_ops([ensure(R, b"a", a, "d"), ensure(a, b"b", b, "d")]))
    with SecondaryFS(bytes(root)) as fs:
        assert fs.list_dir(b) == []
    os.rename(root / "a", root / "a.real")
    os.symlink(canary, root / "a")
    with SecondaryFS(bytes(root)) as fs, pytest.raises(NotFound):
        fs.list_dir(b)
