"""Table tests for the pure reconciler: what ops make a secondary directory equal."""

from __future__ import annotations

import pytest

from actors.reconcile import (
    INLINE_MAX,
    Remote,
    SeenLinks,
    dir_meta_needed,
    meta_differs,
    plan_dir,
)
from fsops.constants import NO_GFID
from fsops.primary import Entry

P = b"P" * 16


def g(n: int) -> bytes:
    return n.to_bytes(16, "big")


def ent(name: bytes, gid: int, t: str = "f", *, size: int = 10, mtime: int = 5, nlink: int = 1,
        mode: int = 0o644, target: bytes | None = None) -> Entry:
    return Entry(name, g(gid), t, mode, 0, 0, size, 1, mtime, 1, nlink, gid, 0, target, {}, b"")


def rem(name: bytes, gid: int | None, t: str = "f", *, size: int = 10, mtime: int = 5,
        mode: int = 0o644) -> Remote:
    return Remote(name, None if gid is None else g(gid), t, mode, 0, 0, size, mtime, b"", 1)


def kinds(plan) -> list[tuple[str, bytes]]:
    return [(op["op"], op.get("name", op.get("gfid"))) for op in plan.ops]


def test_identical_directory_needs_nothing() -> None:
    p = [ent(b"a", 1), ent(b"d", 2, "d", size=0)]
    s = [rem(b"a", 1), rem(b"d", 2, "d", size=0)]
    plan = plan_dir(P, b"", p, s, SeenLinks())
    assert plan.ops == [] and plan.data == [] and plan.entry_ops == 0
    assert [sd.entry.name for sd in plan.subdirs] == [b"d"]
    assert plan.subdirs[0].remote is not None


@pytest.mark.parametrize(
    ("primary", "secondary", "expected"),
    [
        # new small file: one ensure carrying its data
        ([ent(b"a", 1)], [], [("ensure", b"a")]),
        # deleted on the primary: one gfid-checked delete
        ([], [rem(b"a", 1)], [("delete", b"a")]),
        # renamed within the directory: ensure of the same gfid (the applier links or
        # renames), then delete of the old name (a no-op once the rename happened)
        ([ent(b"b", 1)], [rem(b"a", 1)], [("ensure", b"b"), ("delete", b"a")]),
        # swap a<->b: two ensures, no delete, no data
        ([ent(b"a", 2), ent(b"b", 1)], [rem(b"a", 1), rem(b"b", 2)],
         [("ensure", b"a"), ("ensure", b"b")]),
        # file replaced by a directory of the same name
        ([ent(b"a", 3, "d", size=0)], [rem(b"a", 1)], [("ensure", b"a")]),
        # pre-seeded copy without gfid: ensure adopts it
        ([ent(b"a", 1)], [rem(b"a", None)], [("ensure", b"a")]),
    ],
)
def test_entry_plans(primary, secondary, expected) -> None:
    plan = plan_dir(P, b"", primary, secondary, SeenLinks())
    assert kinds(plan) == expected


def test_ensures_come_before_deletes_and_meta_last() -> None:
    p = [ent(b"new", 9), ent(b"same", 2, mode=0o600)]
    s = [rem(b"gone", 1), rem(b"same", 2, mode=0o644)]
    plan = plan_dir(P, b"", p, s, SeenLinks())
    assert [op["op"] for op in plan.ops] == ["ensure", "delete", "meta"]
    assert plan.entry_ops == 2


def test_delete_of_object_without_gfid_uses_no_gfid_marker() -> None:
    plan = plan_dir(P, b"", [], [rem(b"junk", None)], SeenLinks())
    assert plan.ops[0]["gfid"] == NO_GFID


def test_small_changed_file_goes_inline_large_goes_to_syncer() -> None:
    p = [ent(b"small", 1, size=100, mtime=9), ent(b"big", 2, size=INLINE_MAX + 1, mtime=9)]
    s = [rem(b"small", 1, size=100, mtime=5), rem(b"big", 2, size=INLINE_MAX + 1, mtime=5)]
    plan = plan_dir(P, b"dir", p, s, SeenLinks())
    assert kinds(plan) == [("ensure", b"small")]
    assert plan.want_data == [0]
    assert [(j.relpath, j.remote_size, j.ensure_index) for j in plan.data] == [
        (b"dir/big", INLINE_MAX + 1, None)]


def test_new_large_file_data_job_points_at_its_ensure() -> None:
    plan = plan_dir(P, b"", [ent(b"x", 1), ent(b"y", 2, size=INLINE_MAX * 4)], [], SeenLinks())
    assert plan.want_data == [0]
    assert plan.data[0].ensure_index == 1 and plan.data[0].remote_size is None


def test_hardlink_data_moves_once() -> None:
    seen = SeenLinks()
    p1 = plan_dir(P, b"", [ent(b"a", 7, nlink=2, size=INLINE_MAX * 2)], [], seen)
    p2 = plan_dir(g(99), b"d", [ent(b"b", 7, nlink=2, size=INLINE_MAX * 2)], [], seen)
    assert len(p1.data) == 1 and p2.data == []
    assert kinds(p2) == [("ensure", b"b")] and "meta" not in p2.ops[0]


def test_symlink_mode_is_not_compared() -> None:
    e = ent(b"l", 1, "l", size=0, mode=0o777, target=b"x")
    assert not meta_differs(e, rem(b"l", 1, "l", size=0, mode=0o755))
    assert meta_differs(ent(b"f", 1), rem(b"f", 1, mode=0o600))


def test_dir_meta_after_entry_changes_or_when_new() -> None:
    d = ent(b"d", 5, "d", size=0)
    empty = plan_dir(P, b"", [], [], SeenLinks())
    assert dir_meta_needed(d, None, empty)
    assert not dir_meta_needed(d, rem(b"d", 5, "d", size=0), empty)
    changed = plan_dir(P, b"", [ent(b"a", 1)], [], SeenLinks())
    assert dir_meta_needed(d, rem(b"d", 5, "d", size=0), changed)


def test_seen_links_is_bounded() -> None:
    seen = SeenLinks(limit=3)
    for i in range(10):
        assert seen.first_time(g(i))
    assert not seen.first_time(g(9))
    assert seen.first_time(g(0))  # forgotten: re-checked, never wrong


def test_adoption_with_same_data_pushes_only_if_the_applier_creates() -> None:
    p = [ent(b"a", 1, size=500, mtime=9)]
    s = [rem(b"a", None, size=500, mtime=9)]
    plan = plan_dir(P, b"", p, s, SeenLinks())
    assert kinds(plan) == [("ensure", b"a")] and plan.want_data == []
    assert [(j.if_created, j.ensure_index) for j in plan.data] == [(True, 0)]
