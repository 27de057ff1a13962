"""A secondary host applying batches with a pool of threads (GEOREP_APPLY_THREADS)
converges like the default one: first sync, the change mix, a no-change sync.

Real processes and files; the pool size reaches the secondary host through the
environment it inherits from the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.secondary_host import APPLY_THREADS, apply_threads
from tests.e2e.helpers import sync_once
from tests.support.compare import compare_trees
from tests.support.treegen import apply_changes, make_tree

pytestmark = pytest.mark.timeout(600)


def test_pool_size_from_the_environment() -> None:
    assert apply_threads({}) == APPLY_THREADS
    assert apply_threads({"GEOREP_APPLY_THREADS": "4"}) == 4
    assert apply_threads({"GEOREP_APPLY_THREADS": "0"}) == 1
    assert apply_threads({"GEOREP_APPLY_THREADS": "1000"}) == 64
    assert apply_threads({"GEOREP_APPLY_THREADS": "many"}) == APPLY_THREADS


def test_pooled_secondary_converges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOREP_APPLY_THREADS", "4")
    primary, secondary = tmp_path / "p", tmp_path / "s"
    make_tree(primary, seed=11, entries=3000, big_sparse=False, big_files_mib=1,
              big_dir_files=600)
    first = sync_once(primary, secondary)
    assert first["ok"] and not first["failures"]
    assert compare_trees(primary, secondary) == []
    assert first["counters"]["created"] >= 2900

    apply_changes(primary, seed=12)
    second = sync_once(primary, secondary)
    assert second["ok"] and not second["failures"]
    assert compare_trees(primary, secondary) == []

    third = sync_once(primary, secondary)
    assert third["ok"] and not third["failures"]
    assert compare_trees(primary, secondary) == []
    c = third["counters"]
    assert not c.get("created") and not c.get("deleted") and not c.get("renamed")
