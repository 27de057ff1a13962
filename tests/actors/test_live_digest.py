"""How journal records become a live round's re-checks (actors/live.digest)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import live
from actors.live import Work, digest
from fsops.constants import ROOT_GFID
from fsops.dirmap import DirMap
from fsops.journal import OVERFLOW, STOP, Record

D1 = bytes(range(1, 17))
D2 = bytes(range(2, 18))
F1 = bytes(range(3, 19))


@pytest.fixture
def dirmap(tmp_path: Path) -> Iterator[DirMap]:
    m = DirMap(str(tmp_path / "dirmap.db"))
    yield m
    m.close()


def test_entries_name_only_their_names(dirmap: DirMap) -> None:
    w = Work()
    digest([Record.entry(1, D1, b"a"), Record.entry(2, D1, b"b"), Record.entry(3, D1, b"a")],
           dirmap, w)
    assert w.targets() == [(D1, [b"a", b"b"])]
    assert w.records == 3 and w.last_ts == 3


def test_rename_names_both_ends_and_moves_a_known_directory(dirmap: DirMap) -> None:
    dirmap.set(F1, D1, b"old")
    w = Work()
    digest([Record.rename(5, D1, b"old", D2, b"new", F1)], dirmap, w)
    assert dict(w.targets()) == {D1: [b"old"], D2: [b"new"]}
    assert dirmap.get(F1) == (D2, b"new")


def test_data_names_the_file_and_forces_its_data(dirmap: DirMap) -> None:
    w = Work()
    digest([Record.data(1, F1, D1, b"f"), Record.meta(2, D2, ROOT_GFID, b"d")], dirmap, w)
    assert dict(w.targets()) == {D1: [b"f"], ROOT_GFID: [b"d"]}
    assert w.force == {F1}


def test_a_directorys_own_event_checks_only_itself(dirmap: DirMap) -> None:
    w = Work()
    digest([Record.meta(1, D1)], dirmap, w)
    assert w.targets() == [(D1, [])]
    digest([Record.entry(2, D1, b"x")], dirmap, w)
    assert w.targets() == [(D1, [b"x"])]


def test_many_names_fall_back_to_the_whole_directory(dirmap: DirMap,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "NAMES_MAX", 3)
    w = Work()
    digest([Record.entry(i, D1, b"n%d" % i) for i in range(5)], dirmap, w)
    assert w.targets() == [(D1, None)]
    w.own(D1)
    w.name(D1, b"more")
    assert w.targets() == [(D1, None)]  # whole stays whole


def test_markers_are_gaps(dirmap: DirMap) -> None:
    w = Work()
    digest([Record.marker(OVERFLOW, 1)], dirmap, w)
    assert w.gap and "overflow" in w.gap
    w2 = Work()
    digest([Record.marker(STOP, 1)], dirmap, w2)
    assert w2.gap == "the recorder restarted"
