"""Tests for the test-support helpers (tree generator and comparer)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.compare import compare_trees, diff_snapshots, show, snapshot_tree
from tests.support.treegen import apply_changes, make_tree

IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]
SMALL: dict[str, Any] = {
    "entries": 600,
    "big_sparse": False,
    "big_files_mib": 1,
    "big_dir_files": 60,
}

needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")


def B(root: Path, rel: bytes) -> bytes:
    return os.fsencode(root) + b"/" + rel


def rsync_copy(src: Path, dst: Path) -> None:
    subprocess.run(
        [
            "rsync",
            "-aHAXSU",
            "--modify-window=-1",
            "--open-noatime",
            "--numeric-ids",
            os.fsencode(src) + b"/",
            os.fsencode(dst) + b"/",
        ],
        check=True,
    )


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("gen") / "primary"
    summary = make_tree(root, seed=5, **SMALL)
    return root, summary


@pytest.fixture
def pair(small_tree: tuple[Path, dict[str, Any]], tmp_path: Path) -> tuple[Path, Path]:
    """A fresh (primary, secondary) pair of identical trees."""
    src, _ = small_tree
    p, s = tmp_path / "p", tmp_path / "s"
    rsync_copy(src, p)
    rsync_copy(p, s)
    return p, s


# ---------------------------------------------------------------- treegen


def test_summary_has_every_kind(small_tree: tuple[Path, dict[str, Any]]) -> None:
    root, s = small_tree
    assert s["entries"] >= 600
    for key in (
        "dirs",
        "files",
        "empty_files",
        "symlinks_relative",
        "symlinks_absolute_inside",
        "symlinks_absolute_outside",
        "symlinks_dangling",
        "fifos",
        "big_files",
        "sparse_files",
        "hardlink_pairs",
        "hardlink_triples",
        "hardlink_cross_dir_groups",
        "odd_names",
        "non_utf8_names",
        "names_255",
        "dirs_500plus",
        "setuid",
        "setgid",
        "sticky_dirs",
        "xattr_entries",
        "xattr_binary_values",
        "acl_entries",
        "default_acl_dirs",
        "pre_1970_mtimes",
        "future_mtimes",
    ):
        assert s[key] > 0, key
    assert s["max_depth"] >= 40
    if IS_ROOT:
        assert s["chardevs"] == 1
        assert s["non_root_owned"] > 0
    # spot checks on disk
    rb = os.fsencode(root)
    assert b"\xff\xfe-latin1-\xe9" in os.listdir(rb + b"/odd")
    assert os.stat(rb + b"/modes/setuid").st_mode & 0o7777 == 0o4755
    assert os.stat(rb + b"/modes/sticky").st_mode & 0o7777 == 0o1777
    assert os.stat(rb + b"/large/big16.bin").st_size == 16 * 1024 * 1024
    st = os.stat(rb + b"/sparse/small_sparse.bin")
    assert st.st_blocks * 512 < st.st_size
    assert os.lstat(rb + b"/links/pair_a").st_ino == os.lstat(rb + b"/links/pair_b").st_ino
    assert os.getxattr(rb + b"/odd/with space", b"user.binary")[:3] == b"\x00\x01\x02"
    assert b"system.posix_acl_default" in [os.fsencode(x) for x in os.listxattr(rb + b"/acl")]
    assert os.stat(rb + b"/modes/m0600").st_mtime_ns < 0
    times = [os.lstat(rb + b"/" + n).st_mtime_ns % 10**9 for n in (b"odd", b"links/rel")]
    assert all(times)
    # the tree is far enough from the root and the path stays below PATH_MAX
    deepest = max((d for d, _, _ in os.walk(rb)), key=lambda d: d.count(b"/"))
    assert deepest.count(b"/") - rb.count(b"/") >= 40
    assert len(deepest) < 4096


def test_make_tree_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "t"
    kw: dict[str, Any] = dict(SMALL, entries=300, big_dir_files=10)
    s1 = make_tree(root, seed=11, **kw)
    snap1 = snapshot_tree(root)
    shutil.rmtree(root)
    s2 = make_tree(root, seed=11, **kw)
    snap2 = snapshot_tree(root)
    assert s1 == s2
    assert diff_snapshots(snap1, snap2, ignore_fields=("ino",)) == []
    shutil.rmtree(root)
    make_tree(root, seed=12, **kw)
    assert diff_snapshots(snap1, snapshot_tree(root), ignore_fields=("ino",)) != []


def test_data_mib_tops_up_data_and_keeps_the_entry_count(tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(SMALL, entries=1000, big_dir_files=10)
    plain = make_tree(tmp_path / "plain", seed=3, **kw)
    full = make_tree(tmp_path / "full", seed=3, data_mib=40, **kw)
    assert plain["media_files"] == 0
    assert full["media_files"] > 0
    assert full["entries"] == plain["entries"]
    assert full["data_bytes"] >= 40 << 20
    on_disk = 0
    for d, _, files in os.walk(tmp_path / "full" / "media"):
        on_disk += sum(os.lstat(os.path.join(d, f)).st_size for f in files)
    assert on_disk > 0
    assert full["data_bytes"] - plain["data_bytes"] >= on_disk - (1 << 20)


def test_make_tree_refuses_non_empty(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"")
    with pytest.raises(FileExistsError):
        make_tree(tmp_path, entries=10)


@needs_rsync
def test_apply_changes(small_tree: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    src, _ = small_tree
    p, before = tmp_path / "p", tmp_path / "before"
    rsync_copy(src, p)
    rsync_copy(p, before)
    big_before = (p / "large/big16.bin").read_bytes()
    res = apply_changes(p)
    rb = os.fsencode(p)

    old, new = res["renamed_dir"]
    assert not os.path.lexists(rb + b"/" + old)
    assert len(os.listdir(rb + b"/" + new)) == SMALL["big_dir_files"] == res["renamed_dir_files"]
    assert os.path.isdir(rb + b"/" + res["file_to_dir"])
    assert os.path.isfile(rb + b"/" + res["dir_to_file"])
    assert os.path.isdir(rb + b"/" + res["symlink_to_dir"])
    assert not os.path.islink(rb + b"/" + res["symlink_to_dir"])
    assert not os.path.lexists(rb + b"/" + res["deleted_subtree"])
    path, size = res["truncated"]
    assert os.path.getsize(rb + b"/" + path) == size
    a, b = res["swapped"]
    assert (p / os.fsdecode(a)).read_bytes() == (before / os.fsdecode(b)).read_bytes()
    assert (p / os.fsdecode(b)).read_bytes() == (before / os.fsdecode(a)).read_bytes()
    off, n = res["overwritten_range"]
    big_after = (p / os.fsdecode(res["big_file"])).read_bytes()
    assert len(big_after) == len(big_before) >= 16 * 1024 * 1024
    assert big_after[:off] == big_before[:off] and big_after[off + n :] == big_before[off + n :]
    assert big_after[off : off + n] != big_before[off : off + n]
    src_hl, new_hl = res["hardlink_added"]
    assert os.stat(rb + b"/" + src_hl).st_ino == os.stat(rb + b"/" + new_hl).st_ino

    text = "\n".join(compare_trees(before, p))
    for expected in (
        "missing in secondary: big5k",
        "extra in secondary: moved/big5k.renamed",
        "content differs: large/big16.bin",
        "type differs: chg/file2dir",
        "type differs: chg/dir2file",
        "type differs: chg/sym2dir",
        "missing in secondary: chg/delsub",
        "size differs: chg/trunc.bin",
        "size differs: chg/append.bin",
        "mode differs: chg/chmod_me",
        "mode differs: chg/chmod_dir",
        "missing in secondary: links/tri1",
        "extra in secondary: chg/hl_new",
    ):
        assert expected in text, expected
    if IS_ROOT:
        assert "uid differs: chg/chown_me" in text
        assert "uid differs: links/rel" in text
    # a fresh copy of the changed tree is identical again
    after = tmp_path / "after"
    rsync_copy(p, after)
    assert compare_trees(p, after) == []


def test_treegen_cli(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.treegen",
            str(tmp_path / "t"),
            "--seed",
            "3",
            "--entries",
            "200",
            "--small",
            "--big-dir-files",
            "5",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert '"entries"' in out
    assert (tmp_path / "t" / "large" / "big16.bin").exists()


# ---------------------------------------------------------------- compare


@needs_rsync
def test_identical_copies_compare_equal(pair: tuple[Path, Path]) -> None:
    p, s = pair
    assert compare_trees(p, s) == []
    assert compare_trees(p, s, check_atime=True) == []


@needs_rsync
def test_georep_private_state_is_ignored(pair: tuple[Path, Path]) -> None:
    """A gfid index (hardlinks under .georep, raising st_nlink) and georep xattrs."""
    p, s = pair
    sb = os.fsencode(s)
    idx = sb + b"/.georep/gfid"
    with keep_parent_mtime(sb + b"/.georep"):
        os.makedirs(idx)
    n = 0
    for dirpath, _dirnames, filenames in os.walk(sb):
        if dirpath.startswith(sb + b"/.georep"):
            continue
        for f in filenames:
            full = dirpath + b"/" + f
            if os.path.isfile(full) and not os.path.islink(full):
                try:
                    os.link(full, idx + b"/%d" % n)
                except FileExistsError:
                    pass
                n += 1
    os.setxattr(sb + b"/odd/with space", b"trusted.georep.gfid", b"\x01" * 16)
    os.setxattr(sb + b"/odd", b"user.georep.stime", b"123")
    with keep_parent_mtime(os.fsencode(p) + b"/.georep"):
        os.makedirs(os.fsencode(p) + b"/.georep")
    assert compare_trees(p, s) == []


@contextmanager
def keep_parent_mtime(path: bytes) -> Iterator[None]:
    """Restore the parent directory's times after adding/removing ``path``."""
    parent = path.rsplit(b"/", 1)[0]
    st = os.lstat(parent)
    yield
    os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_meta(st: os.stat_result, path: bytes) -> None:
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not os.path.islink(path):
        os.chmod(path, st.st_mode & 0o7777)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _flip_byte(p: Path, s: Path) -> bytes:
    rel = b"large/big1.bin"
    path = B(s, rel)
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(777_777)
        c = f.read(1)
        f.seek(777_777)
        f.write(bytes([c[0] ^ 0x40]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return rel


def _chmod(p: Path, s: Path) -> bytes:
    os.chmod(B(s, b"modes/m0644"), 0o640)
    return b"modes/m0644"


def _chown(p: Path, s: Path) -> bytes:
    st = os.lstat(B(s, b"links/dangling"))
    os.chown(B(s, b"links/dangling"), st.st_uid + 1, st.st_gid, follow_symlinks=False)
    return b"links/dangling"


def _mtime_ns(p: Path, s: Path) -> bytes:
    rel = b"odd/\xff\xfe-latin1-\xe9"
    st = os.lstat(B(s, rel))
    os.utime(B(s, rel), ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    return rel


def _symlink_mtime(p: Path, s: Path) -> bytes:
    rel = b"links/rel"
    st = os.lstat(B(s, rel))
    os.utime(B(s, rel), ns=(st.st_atime_ns, st.st_mtime_ns + 1), follow_symlinks=False)
    return rel


def _dir_mtime(p: Path, s: Path) -> bytes:
    st = os.lstat(B(s, b"deep"))
    os.utime(B(s, b"deep"), ns=(st.st_atime_ns, st.st_mtime_ns - 1000))
    return b"deep"


def _xattr_value(p: Path, s: Path) -> bytes:
    os.setxattr(B(s, b"odd/with space"), b"user.binary", b"\x00changed")
    return b"odd/with space"


def _xattr_extra(p: Path, s: Path) -> bytes:
    os.setxattr(B(s, b"links"), b"user.new", b"x")
    return b"links"


def _acl(p: Path, s: Path) -> bytes:
    path = B(s, b"acl/explicit")
    mode = os.stat(path).st_mode & 0o7777
    subprocess.run(["setfacl", "-m", "u:1009:r--", path], check=True)
    assert os.stat(path).st_mode & 0o7777 == mode
    return b"acl/explicit"


def _missing(p: Path, s: Path) -> bytes:
    rel = b"odd/new\nline"
    with keep_parent_mtime(B(s, rel)):
        os.unlink(B(s, rel))
    return rel


def _extra(p: Path, s: Path) -> bytes:
    rel = b"wide/extra \xee"
    with keep_parent_mtime(B(s, rel)):
        Path(os.fsdecode(B(s, rel))).write_bytes(b"")
    return rel


def _extra_dir_in_deep(p: Path, s: Path) -> bytes:
    deepest = max((d for d, _, _ in os.walk(B(s, b"deep"))), key=lambda d: d.count(b"/"))
    with keep_parent_mtime(deepest + b"/x"):
        os.mkdir(deepest + b"/x")
    return deepest[len(os.fsencode(s)) + 1 :] + b"/x"


def _symlink_target(p: Path, s: Path) -> bytes:
    rel = b"links/dangling"
    path = B(s, rel)
    st = os.lstat(path)
    with keep_parent_mtime(path):
        os.unlink(path)
        os.symlink(b"does/not/exist2", path)
    _copy_meta(st, path)
    return rel


def _clone_over(path: bytes) -> None:
    """Replace ``path`` by an independent copy with identical metadata (and xattrs)."""
    tmp = path + b".tmp"
    st = os.lstat(path)
    shutil.copy2(path, tmp, follow_symlinks=False)
    os.rename(tmp, path)
    _copy_meta(st, path)


def _break_hardlink(p: Path, s: Path) -> bytes:
    with keep_parent_mtime(B(s, b"links/pair_b")):
        _clone_over(B(s, b"links/pair_b"))
    return b"links/pair_a, links/pair_b"


def _join_hardlink(p: Path, s: Path) -> bytes:
    """Two primary files with equal content and metadata are one inode on the secondary."""
    for root in (p, s):
        for name in (b"modes/same1", b"modes/same2"):
            path = B(root, name)
            Path(os.fsdecode(path)).write_bytes(b"same content")
            os.utime(path, ns=(10**18 + 1, 10**18 + 7))
    with keep_parent_mtime(B(s, b"modes/same2")):
        os.unlink(B(s, b"modes/same2"))
        os.link(B(s, b"modes/same1"), B(s, b"modes/same2"))
    st = os.lstat(B(p, b"modes"))
    os.utime(B(s, b"modes"), ns=(st.st_atime_ns, st.st_mtime_ns))
    return b"modes/same1, modes/same2"


def _fill_sparse(p: Path, s: Path) -> bytes:
    rel = b"sparse/small_sparse.bin"
    path = B(s, rel)
    st = os.stat(path)
    data = Path(os.fsdecode(path)).read_bytes()
    with open(path, "r+b") as f:
        f.write(data)  # rewrite every byte: holes become allocated zeros
        f.flush()
        os.fsync(f.fileno())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_blocks * 512 >= st.st_size
    return rel


def _type_change(p: Path, s: Path) -> bytes:
    rel = b"special/fifo"
    path = B(s, rel)
    st = os.lstat(path)
    with keep_parent_mtime(path):
        os.unlink(path)
        Path(os.fsdecode(path)).write_bytes(b"")
    _copy_meta(st, path)
    return rel


def _file_to_dir(p: Path, s: Path) -> bytes:
    rel = b"odd/glob*?[x"
    path = B(s, rel)
    st = os.lstat(path)
    with keep_parent_mtime(path):
        os.unlink(path)
        os.mkdir(path)
    _copy_meta(st, path)
    return rel


def _rdev(p: Path, s: Path) -> bytes:
    rel = b"special/null"
    path = B(s, rel)
    st = os.lstat(path)
    with keep_parent_mtime(path):
        os.unlink(path)
        os.mknod(path, st.st_mode, os.makedev(1, 5))
    _copy_meta(st, path)
    return rel


def _root_mode(p: Path, s: Path) -> bytes:
    os.chmod(s, 0o700)
    return b""


Mutation = Callable[[Path, Path], bytes]
MUTATIONS: list[tuple[str, Mutation, str]] = [
    ("content byte", _flip_byte, "content differs"),
    ("mode", _chmod, "mode differs"),
    ("uid", _chown, "uid differs"),
    ("mtime ns", _mtime_ns, "mtime differs"),
    ("symlink mtime", _symlink_mtime, "mtime differs"),
    ("dir mtime", _dir_mtime, "mtime differs"),
    ("xattr value", _xattr_value, "xattr value differs"),
    ("xattr extra", _xattr_extra, "xattr extra in secondary"),
    ("acl", _acl, "xattr value differs"),
    ("missing file", _missing, "missing in secondary"),
    ("extra file", _extra, "extra in secondary"),
    ("extra deep", _extra_dir_in_deep, "extra in secondary"),
    ("symlink target", _symlink_target, "symlink target differs"),
    ("broken hardlink group", _break_hardlink, "hardlink group not kept in secondary"),
    ("joined hardlink group", _join_hardlink, "hardlink group only in secondary"),
    ("sparse file filled", _fill_sparse, "sparseness lost"),
    ("type change", _type_change, "type differs"),
    ("file to dir", _file_to_dir, "type differs"),
    ("root mode", _root_mode, "mode differs"),
    ("rdev", _rdev, "rdev differs"),
]


@needs_rsync
@pytest.mark.parametrize(("what", "mutate", "expected"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_single_difference_is_reported(
    pair: tuple[Path, Path], what: str, mutate: Mutation, expected: str
) -> None:
    p, s = pair
    if what in ("uid", "rdev") and not IS_ROOT:
        pytest.skip("needs root")
    rel = mutate(p, s)
    diffs = compare_trees(p, s)
    assert len(diffs) == 1, diffs
    assert expected in diffs[0], diffs
    assert show(rel) in diffs[0], (diffs, show(rel))
    # swapping the sides still detects it (sparseness is one-way by design)
    if what != "sparse file filled":
        assert compare_trees(s, p) != []


@needs_rsync
def test_atime_only_checked_on_request(pair: tuple[Path, Path]) -> None:
    p, s = pair
    path = B(s, b"large/big2.bin")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns + 5, st.st_mtime_ns))
    assert compare_trees(p, s) == []
    assert any("atime differs: large/big2.bin" in d for d in compare_trees(p, s, check_atime=True))


@needs_rsync
def test_compare_cli(pair: tuple[Path, Path]) -> None:
    p, s = pair
    cmd = [sys.executable, "-m", "tests.support.compare", str(p), str(s)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    _chmod(p, s)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1
    assert "mode differs: modes/m0644" in r.stdout


# ---------------------------------------------------------------- snapshots


@needs_rsync
def test_snapshot_unchanged_by_reading_with_compare(pair: tuple[Path, Path]) -> None:
    p, s = pair
    before = snapshot_tree(p)
    assert compare_trees(p, s) == []
    # georep's own state is ignored
    pb = os.fsencode(p)
    os.setxattr(pb + b"/large/big1.bin", b"trusted.georep.gfid", b"\x02" * 16)
    os.setxattr(pb + b"/odd", b"user.georep.xtime", b"1")
    os.makedirs(pb + b"/.georep/marks")
    # ctime changes are ignored
    os.chmod(pb + b"/links/pair_a", os.stat(pb + b"/links/pair_a").st_mode & 0o7777)
    after = snapshot_tree(p, include_root=False)
    before.pop(b"")
    assert diff_snapshots(before, after) == []


@needs_rsync
def test_snapshot_detects_changes(pair: tuple[Path, Path]) -> None:
    p, _ = pair
    pb = os.fsencode(p)
    before = snapshot_tree(p)

    # a plain read (no O_NOATIME) of a file whose atime is old moves its atime
    with open(pb + b"/modes/m0664", "rb") as f:
        f.read()
    os.setxattr(pb + b"/modes/m0644", b"user.comment", b"other")
    st = os.lstat(pb + b"/links/rel")
    os.utime(pb + b"/links/rel", ns=(st.st_atime_ns, st.st_mtime_ns + 1), follow_symlinks=False)
    _clone_over(pb + b"/links/cross_a")
    _flip_byte(p, p)
    diffs = diff_snapshots(before, snapshot_tree(p))
    text = "\n".join(diffs)
    assert "atime_ns changed: modes/m0664" in text
    assert "xattrs changed: modes/m0644" in text
    assert "mtime_ns changed: links/rel" in text
    assert "ino changed: links/cross_a" in text
    assert "links changed: links/sub/cross_b" in text
    assert "digest changed: large/big1.bin" in text
    with pytest.raises(ValueError):
        diff_snapshots(before, before, ignore_fields=("nope",))
