"""Acceptance of ``georep-node sync PRIMARY SECONDARY --once`` on a hostile 20,000-entry tree.

Real processes (the CLI and its secondary host), real files, nothing mocked.  The
tests of this module run in order on one tree: first sync, change mix, second sync,
no-change sync.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.e2e.helpers import sync_once
from tests.support.compare import compare_trees, diff_snapshots, snapshot_tree
from tests.support.treegen import apply_changes, make_tree

MIB = 1 << 20

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("once")
    primary = base / "primary"
    summary = make_tree(primary, seed=7, entries=20_000)
    return {"base": base, "primary": primary, "secondary": base / "secondary",
            "tree": summary}


@pytest.fixture(scope="module")
def first(world: dict[str, Any]) -> dict[str, Any]:
    before = snapshot_tree(world["primary"])
    summary = sync_once(world["primary"], world["secondary"])
    world["after_first"] = snapshot_tree(world["primary"])
    world["before_first"] = before
    return summary


def test_tree_is_hostile_enough(world: dict[str, Any]) -> None:
    t = world["tree"]
    assert t["entries"] >= 20_000
    for kind in ("non_utf8_names", "hardlink_groups", "fifos", "setuid", "setgid",
                 "sticky_dirs", "acl_entries", "xattr_entries", "sparse_files",
                 "symlinks_dangling", "symlinks_absolute_outside", "big_files"):
        assert t[kind] > 0, kind
    assert t["max_depth"] >= 40


def test_first_sync_makes_an_exact_replica(world: dict[str, Any], first: dict[str, Any]) -> None:
    assert first["ok"] and not first["failures"]
    assert compare_trees(world["primary"], world["secondary"]) == []
    c = first["counters"]
    assert c["created"] + c.get("linked", 0) >= world["tree"]["entries"] - 1
    # the 256 MiB sparse file moved only its data extents
    assert first["transfer"]["bytes_sent"] < 128 * MIB


def test_first_sync_leaves_primary_unchanged(world: dict[str, Any], first: dict[str, Any]) -> None:
    # Only gfid xattrs and marks (georep's own, ignored by the snapshot) may differ;
    # atimes included: georep reads with O_NOATIME.
    assert diff_snapshots(world["before_first"], world["after_first"]) == []


def test_secondary_objects_carry_primary_gfids(world: dict[str, Any],
                                               first: dict[str, Any]) -> None:
    from fsops.constants import GFID_XATTR

    for rel in ("chg/swap_a", "large", "large/big16.bin"):
        p = os.getxattr(world["primary"] / rel, GFID_XATTR)
        s = os.getxattr(world["secondary"] / rel, GFID_XATTR)
        assert p[:16] == s and len(s) == 16


@pytest.fixture(scope="module")
def second(world: dict[str, Any], first: dict[str, Any]) -> dict[str, Any]:
    changes = apply_changes(world["primary"], seed=3)
    old, _new = changes["renamed_dir"]
    world["changes"] = changes
    world["renamed_ino"] = os.stat(os.path.join(os.fsencode(world["secondary"]), old)).st_ino
    swap_a, swap_b = changes["swapped"]
    sec = os.fsencode(world["secondary"])
    world["swap_inos"] = (os.stat(os.path.join(sec, swap_a)).st_ino,
                          os.stat(os.path.join(sec, swap_b)).st_ino)
    return sync_once(world["primary"], world["secondary"])


def test_second_sync_converges(world: dict[str, Any], second: dict[str, Any]) -> None:
    assert second["ok"]
    assert compare_trees(world["primary"], world["secondary"]) == []


def test_first_sync_asks_nothing_about_directories_it_just_named(
        first: dict[str, Any]) -> None:
    """Every directory of a first sync gets its gfid minted as it is read, so no
    secondary can hold it elsewhere: the Crawler makes no ``lookup`` round trip."""
    assert first["counters"].get("dirs_scanned", 0) > 500
    assert first["counters"].get("lookups", 0) == 0


def test_renamed_directory_is_one_rename(world: dict[str, Any], second: dict[str, Any]) -> None:
    old, new = world["changes"]["renamed_dir"]
    sec = os.fsencode(world["secondary"])
    assert os.stat(os.path.join(sec, new)).st_ino == world["renamed_ino"]
    assert not os.path.exists(os.path.join(sec, old))
    assert second["counters"].get("renamed", 0) >= 1
    # Found by asking the secondary about a directory new at its place (a gfid that was
    # not minted in this pass).
    assert second["counters"].get("lookups", 0) >= 1
    # none of its 5,000 files was created again
    assert second["counters"].get("created", 0) < 20


def test_swapped_files_keep_their_inodes(world: dict[str, Any], second: dict[str, Any]) -> None:
    swap_a, swap_b = world["changes"]["swapped"]
    sec = os.fsencode(world["secondary"])
    ino_a, ino_b = world["swap_inos"]
    assert os.stat(os.path.join(sec, swap_a)).st_ino == ino_b
    assert os.stat(os.path.join(sec, swap_b)).st_ino == ino_a


def test_large_file_moved_only_changed_blocks(world: dict[str, Any],
                                              second: dict[str, Any]) -> None:
    t = second["transfer"]
    _, length = world["changes"]["overwritten_range"]
    # 1 MiB overwritten in a 16 MiB file: at most the changed range plus two blocks
    # (128 KiB each) on its edges crosses, the rest is matched by signature.
    assert t["bytes_sent"] <= length + 2 * 128 * 1024
    assert t["bytes_matched"] >= 14 * MIB


def test_third_sync_moves_no_data(world: dict[str, Any], second: dict[str, Any]) -> None:
    third = sync_once(world["primary"], world["secondary"])
    assert third["ok"]
    assert third["transfer"]["bytes_sent"] == 0
    assert third["transfer"]["files"] == 0
    c = third["counters"]
    assert c.get("inline_bytes", 0) == 0
    for k in ("created", "linked", "renamed", "deleted", "adopted", "meta"):
        assert c.get(k, 0) == 0, (k, c)
    assert compare_trees(world["primary"], world["secondary"]) == []


def test_marks_are_set_on_primary_root(world: dict[str, Any], second: dict[str, Any]) -> None:
    names = [n for n in os.listxattr(world["primary"]) if ".georep." in n]
    assert any(n.endswith(".stime") for n in names)
    assert any(n.endswith(".entry_stime") for n in names)
