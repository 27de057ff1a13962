"""Table tests for the reconciler's rules: exclude patterns and ignore-deletes."""

from __future__ import annotations

import pytest

from actors.reconcile import Rules, SeenLinks, plan_dir
from tests.actors.test_reconcile import P, ent, kinds, rem


@pytest.mark.parametrize(
    ("patterns", "relpath", "name", "is_dir", "excluded"),
    [
        # a pattern without '/' matches the name at any depth
        (["*.tmp"], b"a.tmp", b"a.tmp", False, True),
        (["*.tmp"], b"x/y/a.tmp", b"a.tmp", False, True),
        (["*.tmp"], b"a.tmp.keep", b"a.tmp.keep", False, False),
        (["cache"], b"x/cache", b"cache", True, True),
        # case-sensitive, bytes (non-UTF-8 names work)
        (["*.TMP"], b"a.tmp", b"a.tmp", False, False),
        (["\udcff*"], b"\xffname", b"\xffname", False, True),
        # a pattern with '/' matches the path relative to the root, anchored there
        (["build/out"], b"build/out", b"out", True, True),
        (["build/out"], b"x/build/out", b"out", True, False),
        (["/top"], b"top", b"top", False, True),
        (["/top"], b"x/top", b"top", False, False),
        (["logs/*.gz"], b"logs/a.gz", b"a.gz", False, True),
        (["logs/*.gz"], b"logs/old/a.gz", b"a.gz", False, True),  # '*' crosses '/'
        # a trailing '/' matches directories only
        (["tmp/"], b"tmp", b"tmp", True, True),
        (["tmp/"], b"tmp", b"tmp", False, False),
        (["a/tmp/"], b"a/tmp", b"tmp", True, True),
        # several patterns: any one excludes
        (["*.o", "core"], b"core", b"core", False, True),
        ([], b"a", b"a", False, False),
    ],
)
def test_exclude_matching(patterns, relpath, name, is_dir, excluded) -> None:
    assert Rules(patterns).excluded(relpath, name, is_dir) is excluded


def test_path_excluded_looks_at_every_directory_above() -> None:
    r = Rules(["cache/", "build/out"])
    assert r.path_excluded(b"a/cache/b/c", True)
    assert r.path_excluded(b"build/out/x", False)
    assert not r.path_excluded(b"a/b/cache", False)  # a file named cache: dirs only
    assert r.path_excluded(b"a/b/cache", True)
    assert not r.path_excluded(b"", True)
    assert not r.path_excluded(b"a/build/out", True)


def test_excluded_entries_are_neither_created_nor_deleted() -> None:
    rules = Rules(["*.tmp", "skip/"])
    p = [ent(b"a", 1), ent(b"b.tmp", 2), ent(b"skip", 3, "d", size=0), ent(b"c", 4)]
    # the secondary holds old excluded names (replicated before) and a stale one
    s = [rem(b"old.tmp", 7), rem(b"skip", 8, "d", size=0), rem(b"stale", 9)]
    plan = plan_dir(P, b"", p, s, SeenLinks(), rules=rules)
    assert kinds(plan) == [("ensure", b"a"), ("ensure", b"c"), ("delete", b"stale")]
    assert plan.subdirs == []  # the excluded directory is not descended


def test_exclude_by_path_in_a_subdirectory() -> None:
    rules = Rules(["src/gen"])
    p = [ent(b"gen", 1, "d", size=0), ent(b"main", 2)]
    plan = plan_dir(P, b"src", p, [], SeenLinks(), rules=rules)
    assert kinds(plan) == [("ensure", b"main")]
    plan = plan_dir(P, b"lib", p, [], SeenLinks(), rules=rules)
    assert kinds(plan) == [("ensure", b"gen"), ("ensure", b"main")]


def test_a_name_renamed_into_an_excluded_name_leaves_replication() -> None:
    # a -> a.tmp on the primary: the secondary's a is deleted, a.tmp never created
    plan = plan_dir(P, b"", [ent(b"a.tmp", 1)], [rem(b"a", 1)], SeenLinks(),
                    rules=Rules(["*.tmp"]))
    assert kinds(plan) == [("delete", b"a")]


@pytest.mark.parametrize(
    ("primary", "secondary", "expected"),
    [
        # deleted on the primary: left on the secondary
        ([], [rem(b"a", 1)], []),
        ([ent(b"b", 2)], [rem(b"a", 1, "d", size=0), rem(b"b", 2)], []),
        # a leftover without gfid is kept too
        ([], [rem(b"x", None)], []),
        # renamed within the directory: still a rename (ensure, then the old name goes)
        ([ent(b"b", 1)], [rem(b"a", 1)], [("ensure", b"b"), ("delete", b"a")]),
        # a new object taking a name the secondary holds replaces it as usual
        ([ent(b"a", 5)], [rem(b"a", 1)], [("ensure", b"a")]),
        # swap: two ensures
        ([ent(b"a", 2), ent(b"b", 1)], [rem(b"a", 1), rem(b"b", 2)],
         [("ensure", b"a"), ("ensure", b"b")]),
    ],
)
def test_ignore_deletes(primary, secondary, expected) -> None:
    plan = plan_dir(P, b"", primary, secondary, SeenLinks(),
                    rules=Rules(ignore_deletes=True))
    assert kinds(plan) == expected


def test_rules_are_false_when_empty() -> None:
    assert not Rules()
    assert Rules(["x"]) and Rules(ignore_deletes=True)
    assert Rules(["", "/"]).excluded(b"a", b"a", True) is False
