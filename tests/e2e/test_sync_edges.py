"""Edge cases of ``sync --once``: adoption of a pre-seeded secondary, errors, failures."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fsops.constants import GFID_XATTR
from tests.e2e.helpers import georep, sync_once
from tests.support.compare import compare_trees
from tests.support.pagecache import resident_bytes
from tests.support.treegen import make_tree

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    p = tmp_path / "primary"
    make_tree(p, seed=11, entries=1500, big_sparse=False, big_files_mib=1, big_dir_files=200)
    return p


def test_preseeded_secondary_is_adopted_without_moving_data(small: Path, tmp_path: Path) -> None:
    sec = tmp_path / "seeded"
    # A copy made by rsync before georep ever ran: same names and content, no gfids.
    subprocess.run(["rsync", "-aHAXS", "--numeric-ids", f"{small}/", f"{sec}/"], check=True)
    for dirpath, dirnames, filenames in os.walk(os.fsencode(sec)):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            for x in os.listxattr(p, follow_symlinks=False):
                if ".georep." in x:
                    os.removexattr(p, x, follow_symlinks=False)
    ino = os.stat(sec / "large").st_ino
    out = sync_once(small, sec)
    assert out["ok"]
    assert out["counters"]["adopted"] > 1000
    # Objects without gfid that have several links are not adopted (such a link could
    # be planted to reach a file outside the root): the tree's two hardlink groups of
    # the links/ directory are re-created, and only their few KiB move.
    assert out["counters"].get("created", 0) <= 4
    assert out["transfer"]["bytes_sent"] <= 16 * 1024
    assert out["counters"].get("inline_bytes", 0) == 0
    assert os.stat(sec / "large").st_ino == ino
    assert compare_trees(small, sec) == []


def test_preseeded_copy_with_differences_moves_only_differences(small: Path,
                                                                tmp_path: Path) -> None:
    sec = tmp_path / "seeded"
    subprocess.run(["rsync", "-aHAXS", "--numeric-ids", f"{small}/", f"{sec}/"], check=True)
    big = next(p for p in (sec / "large").iterdir() if p.stat().st_size >= 1 << 20)
    with open(big, "r+b") as f:
        f.seek(100_000)
        f.write(b"x" * 1000)
    (sec / "junk-only-on-secondary").write_bytes(b"j")
    out = sync_once(small, sec)
    assert out["ok"]
    assert 0 < out["transfer"]["bytes_sent"] <= 2 * 128 * 1024
    assert not (sec / "junk-only-on-secondary").exists()
    assert compare_trees(small, sec) == []


def test_missing_primary_is_one_line_error(tmp_path: Path) -> None:
    proc = georep("sync", tmp_path / "nope", tmp_path / "sec", "--once")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], proc.stderr
    assert not (tmp_path / "sec").exists() or not any((tmp_path / "sec").iterdir())


def _fill_xattr_room(path: Path) -> bool:
    """Fill ``path``'s xattr space (ext4: one block); False if it never fills."""
    for i in range(200):
        try:
            os.setxattr(path, f"user.fill{i}".encode(), b"x" * 200)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.E2BIG):
                return True
            raise
    return False


def test_no_room_for_the_marks_is_one_line_error(tmp_path: Path) -> None:
    primary = tmp_path / "primary"
    primary.mkdir()
    (primary / "f").write_bytes(b"data")
    if not _fill_xattr_room(primary):
        pytest.skip("this filesystem's xattr space does not fill up")
    proc = georep("sync", primary, tmp_path / "sec", "--once")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot record the" in lines[0] and "mark of session" in lines[0], lines[0]
    assert "room for xattrs is full" in lines[0], lines[0]
    # The data did reach the secondary; only the mark is missing, so the next run re-walks.
    assert (tmp_path / "sec" / "f").read_bytes() == b"data"


def test_unwritable_secondary_is_one_line_error(tmp_path: Path, small: Path) -> None:
    target = tmp_path / "afile"
    target.write_bytes(b"not a directory")
    proc = georep("sync", small, target, "--once")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith(" ")]
    assert lines[-1].startswith("georep-node sync:"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("chattr") is None, reason="chattr (e2fsprogs) not installed")
def test_item_that_cannot_be_synced_is_listed_and_exit_is_nonzero(small: Path,
                                                                  tmp_path: Path) -> None:
    sec = tmp_path / "sec"
    sync_once(small, sec)
    (small / "chg" / "chmod_me").write_bytes(b"new content on the primary")
    victim = sec / "chg" / "chmod_me"
    subprocess.run(["chattr", "+i", str(victim)], check=True)
    try:
        out = sync_once(small, sec, expect=1)
        assert not out["ok"]
        assert out["passes"] == 2  # failed items are retried before giving up
        assert any("chg/chmod_me" in f for f in out["failures"]), out["failures"]
        proc = georep("sync", small, sec, "--once")
        assert proc.returncode == 1
        assert "chg/chmod_me" in proc.stderr.strip().splitlines()[-1]
    finally:
        subprocess.run(["chattr", "-i", str(victim)], check=True)
    out = sync_once(small, sec)
    assert out["ok"]
    assert compare_trees(small, sec) == []


def test_small_sparse_files_keep_their_holes(tmp_path: Path) -> None:
    p, s = tmp_path / "p", tmp_path / "s"
    p.mkdir()
    fd = os.open(p / "holey", os.O_CREAT | os.O_WRONLY, 0o644)
    os.pwrite(fd, b"x" * 100, 40_000)  # data in the middle of a 60 KB file: holes around it
    os.ftruncate(fd, 60_000)
    os.close(fd)
    with open(p / "all-hole", "wb") as f:
        f.truncate(30_000)
    sync_once(p, s)
    assert compare_trees(p, s) == []  # includes the sparseness check
    fd = os.open(p / "holey", os.O_WRONLY)
    os.pwrite(fd, b"y" * 10, 100)  # a change in the first block, which is otherwise a hole
    os.close(fd)
    out = sync_once(p, s)
    assert out["transfer"]["bytes_sent"] <= 8192  # two 4 KiB data extents, never the holes
    assert compare_trees(p, s) == []


def test_a_large_directory_goes_in_slices_and_arrives_whole(tmp_path: Path) -> None:
    # 2,600 entries: three Crawler slices of at most 1,024 ops.  Files over the inline
    # limit and small sparse files (which leave the inline path for a data job) sit in
    # every slice, so each slice's data jobs must find their own ensure.
    primary = tmp_path / "primary"
    big = primary / "big"
    big.mkdir(parents=True)
    for i in range(2600):
        p = big / f"f{i:05d}"
        if i % 250 == 7:
            p.write_bytes(os.urandom(100_000))
        elif i % 250 == 11:
            with open(p, "wb") as f:
                f.truncate(48 * 1024)
                f.seek(40 * 1024)
                f.write(b"tail")
        elif i % 500 == 13:
            os.link(big / f"f{i - 6:05d}", p)
        else:
            p.write_bytes(b"%d\n" % i)
    summary = sync_once(primary, tmp_path / "sec")
    assert summary["ok"]
    c = summary["counters"]
    assert c["data_files"] >= 20, c      # 11 big + 11 sparse, through data jobs
    assert c["batches"] >= 3, c
    assert compare_trees(primary, tmp_path / "sec") == []


def test_big_file_data_goes_around_the_secondarys_page_cache(tmp_path: Path) -> None:
    """A big file's data is written with O_DIRECT on the secondary: its copy is whole and
    correct, and (almost) none of it sits in the secondary's page cache afterwards, so
    storing it cost no copy into the cache."""
    primary, secondary = tmp_path / "p", tmp_path / "s"
    primary.mkdir()
    data = os.urandom(24 << 20) + b"tail not a whole page"
    (primary / "big").write_bytes(data)
    summary = sync_once(primary, secondary)
    assert summary["ok"]
    # Only the unaligned tail's page (and whatever the file system caches for itself)
    assert resident_bytes(secondary / "big") <= 64 << 10
    assert (secondary / "big").read_bytes() == data
    assert compare_trees(primary, secondary) == []


def test_index_that_cannot_be_healed_does_not_stop_the_sync(tmp_path: Path) -> None:
    """Listing a secondary directory also re-records missing index links.  Where that
    repair fails (here an immutable index bucket: EPERM even for root; in the field a full
    disk), the listing still answers and the sync converges; the repair is done by the
    first listing after the bucket is writable again."""
    if not shutil.which("chattr"):
        pytest.skip("needs chattr (e2fsprogs)")
    primary, secondary = tmp_path / "p", tmp_path / "s"
    (primary / "d").mkdir(parents=True)
    for i in range(20):
        (primary / "d" / f"f{i}").write_bytes(os.urandom(100 + i))
    sync_once(primary, secondary)
    gfid = os.getxattr(secondary / "d" / "f7", GFID_XATTR.decode()).hex()
    bucket = secondary / ".georep" / "gfid" / gfid[:2]
    (bucket / gfid).unlink()  # index damage: the listing of d will want to heal it
    frozen = subprocess.run(["chattr", "+i", str(bucket)], capture_output=True, text=True)
    if frozen.returncode != 0:
        pytest.skip(f"chattr +i refused here: {frozen.stderr.strip()}")
    try:
        (primary / "d" / "f3").write_bytes(b"changed while the index is damaged")
        summary = sync_once(primary, secondary)
        assert summary["ok"]
        assert not (bucket / gfid).exists()
        assert compare_trees(primary, secondary) == []
    finally:
        subprocess.run(["chattr", "-i", str(bucket)], check=True)
    sync_once(primary, secondary)
    assert (bucket / gfid).stat().st_ino == (secondary / "d" / "f7").stat().st_ino
