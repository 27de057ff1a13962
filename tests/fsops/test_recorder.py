"""Recorder on the real kernel: fanotify and inotify, real files under tmp_path.

File operations run in a child process: the recorder drops events of its own pid
(fanotify), exactly as it must for the worker's own gfid and mark xattrs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fsops import gfid as gfids
from fsops.constants import ROOT_GFID
from fsops.journal import DATA, ENTRY, META, OVERFLOW, RENAME, JournalReader, JournalWriter, Record
from fsops.recorder import Recorder, fanotify_available

_FAN_WHY = fanotify_available() if os.geteuid() == 0 else "fanotify needs root"
BACKENDS = [
    pytest.param("fanotify", marks=pytest.mark.skipif(
        _FAN_WHY is not None, reason=f"fanotify unavailable: {_FAN_WHY}")),
    "inotify",
]


def run(cwd: Path, code: str) -> None:
    """Run python ``code`` in a child process with cwd = ``cwd`` (bytes names allowed)."""
    subprocess.run([sys.executable, "-c", "import os\n" + textwrap.dedent(code)],
                   cwd=cwd, check=True)


def gfid_of(path: Path) -> bytes:
    st = os.lstat(path)
    return gfids.ensure_gfid(bytes(path), st.st_ino)


class Rig:
    def __init__(self, tmp: Path, backend: str) -> None:
        self.brick = tmp / "brick"
        self.brick.mkdir()
        self.jdir = tmp / "journal"
        self.outside = tmp / "outside"
        self.outside.mkdir()
        self.backend = backend
        self.writer: JournalWriter | None = None
        self.rec: Recorder | None = None
        self.seen = 0

    def start(self) -> Recorder:
        self.writer = JournalWriter(str(self.jdir), root=bytes(self.brick))
        self.rec = Recorder(bytes(self.brick), self.writer, backend=self.backend)
        self.rec.start()
        assert self.rec.backend_name == self.backend
        self.seen = self.writer.last_seq  # the START
        return self.rec

    def do(self, code: str) -> list[Record]:
        """Run ``code`` in the brick, wait until recorded, return the new records."""
        run(self.brick, code)
        assert self.rec is not None
        assert self.rec.sync(30)
        new = [r for r in JournalReader(str(self.jdir)).records_since(seq=self.seen + 1)]
        if new:
            self.seen = new[-1].seq
        return new

    def stop(self) -> None:
        if self.rec is not None:
            self.rec.stop()
        if self.writer is not None:
            self.writer.close()


@pytest.fixture(params=BACKENDS)
def rig(request, tmp_path: Path):
    r = Rig(tmp_path, request.param)
    yield r
    r.stop()


def kinds(recs: list[Record]) -> set[tuple[object, ...]]:
    return {r.key() for r in recs}


def test_entry_ops_with_non_utf8_names(rig: Rig) -> None:
    rig.start()
    recs = rig.do("os.mkdir(b'd\\xff')")
    assert (ENTRY, None, ROOT_GFID, b"d\xff", None, None) in kinds(recs)
    dg = gfid_of(rig.brick / os.fsdecode(b"d\xff"))
    recs = rig.do("open(b'd\\xff/caf\\xe9', 'wb').close(); os.symlink(b't', b'd\\xff/l'); "
                  "os.mkfifo(b'd\\xff/p')")
    assert {(ENTRY, None, dg, n, None, None) for n in (b"caf\xe9", b"l", b"p")} <= kinds(recs)
    recs = rig.do("os.link(b'd\\xff/caf\\xe9', b'hl'); os.unlink(b'd\\xff/caf\\xe9'); "
                  "os.unlink(b'd\\xff/p')")
    assert {(ENTRY, None, ROOT_GFID, b"hl", None, None),
            (ENTRY, None, dg, b"caf\xe9", None, None),
            (ENTRY, None, dg, b"p", None, None)} <= kinds(recs)
    recs = rig.do("os.unlink(b'd\\xff/l'); os.rmdir(b'd\\xff')")
    assert {(ENTRY, None, dg, b"l", None, None),
            (ENTRY, None, ROOT_GFID, b"d\xff", None, None)} <= kinds(recs)


def test_data_and_meta_of_known_files(rig: Rig) -> None:
    (rig.brick / "f").write_bytes(b"x")
    (rig.brick / "sub").mkdir()
    g = gfid_of(rig.brick / "f")
    sg = gfid_of(rig.brick / "sub")
    rig.start()
    recs = rig.do("open('f', 'ab').write(b'more')")
    # D and M of a file name its directory and name: the live crawl re-checks that directory.
    assert (DATA, g, ROOT_GFID, b"f", None, None) in kinds(recs)
    assert all(r.kind != META for r in recs)
    recs = rig.do("os.chmod('f', 0o600)")
    assert kinds(recs) == {(META, g, ROOT_GFID, b"f", None, None)}
    recs = rig.do("os.setxattr('f', b'user.k', b'v')")
    assert kinds(recs) == {(META, g, ROOT_GFID, b"f", None, None)}
    recs = rig.do("os.chmod('sub', 0o700)")
    # a directory's own change names the directory, not its parent: it is what is re-checked
    assert (META, sg, None, None, None, None) in kinds(recs)
    assert (META, sg, ROOT_GFID, b"sub", None, None) not in kinds(recs)
    recs = rig.do("os.utime('.', ns=(1, 1))")
    assert (META, ROOT_GFID, None, None, None, None) in kinds(recs)


def test_file_without_gfid_is_an_entry_to_recheck(rig: Rig) -> None:
    (rig.brick / "new").write_bytes(b"")
    rig.start()
    recs = rig.do("open('new', 'ab').write(b'x')")
    assert kinds(recs) == {(ENTRY, None, ROOT_GFID, b"new", None, None)}


def test_renames_same_dir_and_across(rig: Rig) -> None:
    for d in ("a", "b"):
        (rig.brick / d).mkdir()
    (rig.brick / "a" / "x").write_bytes(b"1")
    ag, bg = gfid_of(rig.brick / "a"), gfid_of(rig.brick / "b")
    g = gfid_of(rig.brick / "a" / "x")
    rig.start()
    recs = rig.do("os.rename('a/x', 'a/y')")
    assert (RENAME, g, ag, b"x", ag, b"y") in kinds(recs)
    recs = rig.do("os.rename('a/y', b'b/z\\x80')")
    assert (RENAME, g, ag, b"y", bg, b"z\x80") in kinds(recs)
    recs = rig.do("os.rename('b', 'a/b2')")
    assert (RENAME, bg, ROOT_GFID, b"b", ag, b"b2") in kinds(recs)
    # the moved directory is still known by its handle/watch: its events keep its gfid
    recs = rig.do("open('a/b2/n', 'wb').close()")
    assert (ENTRY, None, bg, b"n", None, None) in kinds(recs)


def test_moves_across_the_brick_boundary(rig: Rig) -> None:
    (rig.outside / "o").write_bytes(b"")
    (rig.outside / "od").mkdir()
    (rig.brick / "i").write_bytes(b"")
    rig.start()
    recs = rig.do(f"os.rename({str(rig.outside / 'o')!r}, 'in1'); "
                  f"os.rename({str(rig.outside / 'od')!r}, 'ind')")
    assert {(ENTRY, None, ROOT_GFID, b"in1", None, None),
            (ENTRY, None, ROOT_GFID, b"ind", None, None)} <= kinds(recs)
    assert all(r.kind != RENAME for r in recs)
    recs = rig.do("open('ind/f', 'wb').close()")  # a directory moved in is watched
    assert (ENTRY, None, gfid_of(rig.brick / "ind"), b"f", None, None) in kinds(recs)
    recs = rig.do(f"os.rename('i', {str(rig.outside / 'gone')!r})")
    assert kinds(recs) == {(ENTRY, None, ROOT_GFID, b"i", None, None)}


def test_events_outside_the_brick_and_in_georep_are_ignored(rig: Rig) -> None:
    (rig.brick / ".georep").mkdir()
    rig.start()
    out = str(rig.outside)
    recs = rig.do(f"""
        os.mkdir({out!r} + '/d'); open({out!r} + '/d/f', 'wb').write(b'x')
        os.rename({out!r} + '/d/f', {out!r} + '/g'); os.chmod({out!r} + '/g', 0o600)
        open('.georep/x', 'wb').write(b'x'); os.mkdir('.georep/y'); os.rmdir('.georep/y')
    """)
    assert recs == []


def test_own_gfid_assignment_makes_no_records(rig: Rig) -> None:
    rec = rig.start()
    recs = rig.do("os.mkdir('d'); os.mkdir('d/e')")
    assert kinds(recs) >= {(ENTRY, None, ROOT_GFID, b"d", None, None)}
    # the recorder assigns the gfids of d and d/e to name entries inside them
    recs = rig.do("open('d/e/f', 'wb').close()")
    eg = gfids.read_gfid(bytes(rig.brick / "d" / "e"), os.lstat(rig.brick / "d" / "e").st_ino)
    assert eg is not None
    assert kinds(recs) == {(ENTRY, None, eg, b"f", None, None)}
    recs = rig.do("pass")
    assert recs == [] and all(r.kind != META for r in recs)
    assert rec.stats()["records"] >= 3


def test_overflow_is_recorded_and_breaks_coverage(rig: Rig, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # georep asks fanotify for an unlimited queue; the default one can be overflowed.
    monkeypatch.setenv("GEOREP_RECORDER_BOUNDED_QUEUE", "1")
    rec = rig.start()
    before = time.time_ns()
    reader = JournalReader(str(rig.jdir))
    assert reader.coverage(before)
    rec.pause()
    run(rig.brick, "for i in range(20000): open('f%d' % i, 'wb').close()")
    rec.resume()
    assert rec.sync(60)
    recs = list(reader.records_since(before))
    over = [r for r in recs if r.kind == OVERFLOW]
    assert over and rec.stats()["overflows"] >= 1
    assert not reader.coverage(before)
    assert reader.coverage(over[-1].ts + 1)


def test_five_thousand_creates_are_all_recorded(rig: Rig) -> None:
    rig.start()
    recs = rig.do("""
        for d in range(5):
            os.mkdir('d%d' % d)
            for i in range(1000):
                open('d%d/f%d' % (d, i), 'wb').close()
    """)
    names = {(r.pgfid, r.name) for r in recs if r.kind == ENTRY}
    for d in range(5):
        dg = gfid_of(rig.brick / f"d{d}")
        missing = [i for i in range(1000) if (dg, b"f%d" % i) not in names]
        assert missing == []
    assert rig.rec is not None and rig.rec.stats()["overflows"] == 0


def test_on_records_callback_and_stats(rig: Rig) -> None:
    got: list[Record] = []
    rig.writer = JournalWriter(str(rig.jdir), root=bytes(rig.brick))
    rig.rec = Recorder(bytes(rig.brick), rig.writer, backend=rig.backend,
                       on_records=got.extend)
    rig.rec.start()
    rig.seen = rig.writer.last_seq
    rig.do("open('x', 'wb').close()")
    assert any(r.kind == ENTRY and r.name == b"x" for r in got)
    s = rig.rec.stats()
    assert s["events"] >= 1 and s["records"] >= 2


def test_stop_writes_stop_and_coverage_ends(rig: Rig) -> None:
    rig.start()
    t = time.time_ns()
    reader = JournalReader(str(rig.jdir))
    assert reader.coverage(t)
    assert rig.rec is not None
    rig.rec.stop()
    rig.rec = None
    assert not reader.coverage(t)
    assert list(reader.records_since(t))[-1].kind == "STOP"
