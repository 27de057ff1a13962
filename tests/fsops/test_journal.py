"""Journal files: round trip, roll-over, torn tails, crc, lookups, coverage, prune, memory."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from fsops.journal import (
    OVERFLOW,
    START,
    STOP,
    JournalCorrupt,
    JournalError,
    JournalReader,
    JournalWriter,
    Record,
    list_files,
)

G = b"\x11" * 16
P = b"\x22" * 16
T = 1_700_000_000_000_000_000


def sample(ts: int) -> list[Record]:
    return [Record.entry(ts, P, b"caf\xe9"), Record.rename(ts, P, b"a", G, b"b\xff", G),
            Record.rename(ts, P, b"a", G, b"b", None), Record.data(ts, G), Record.meta(ts, G)]


def test_round_trip_assigns_seq_and_keeps_bytes(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path), root=b"/brick") as w:
        w.append([Record.marker(START, T)])
        out = w.append(sample(T + 5))
    assert [r.seq for r in out] == [2, 3, 4, 5, 6]
    got = list(JournalReader(str(tmp_path)).records_since(0))
    assert got[1:-1] == out
    assert got[0].kind == START and got[-1].kind == STOP  # close() after a START writes STOP
    assert got[2].opgfid == P and got[2].oname == b"a" and got[2].nname == b"b\xff"
    assert got[3].gfid is None


def test_seq_and_ts_continue_across_writers_and_ts_never_goes_back(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path)) as w:
        w.append([Record.data(T + 100, G)])
    with JournalWriter(str(tmp_path)) as w:
        (r,) = w.append([Record.data(T, G)])  # a clock stepped back
    assert r.seq == 2 and r.ts == T + 100


def test_single_writer(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path)), pytest.raises(JournalError, match="in use"):
        JournalWriter(str(tmp_path))


def test_roll_over_by_size_and_time(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path / "s"), roll_bytes=1000) as w:
        for i in range(50):
            w.append([Record.data(T + i, G)] * 10)
    files = list_files(str(tmp_path / "s"))
    assert len(files) > 5
    assert [f.first_seq for f in files] == sorted(f.first_seq for f in files)
    got = list(JournalReader(str(tmp_path / "s")).records_since(0))
    assert [r.seq for r in got] == list(range(1, 501))
    with JournalWriter(str(tmp_path / "t"), roll_seconds=0) as w:
        w.append([Record.data(T, G)])
        w.append([Record.data(T + 1, G)])
    assert len(list_files(str(tmp_path / "t"))) == 2
    name = os.path.basename(list_files(str(tmp_path / "t"))[1].path)
    assert name == f"journal.{2:016x}.{T + 1}"


def test_torn_tail_is_truncated_on_open(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path), fsync="none") as w:
        w.append([Record.data(T + i, G) for i in range(10)])
    (jf,) = list_files(str(tmp_path))
    size = os.path.getsize(jf.path)
    with open(jf.path, "r+b") as f:
        f.truncate(size - 3)  # crash in the middle of the last record
    assert [r.seq for r in JournalReader(str(tmp_path)).records_since(0)] == list(range(1, 10))
    with JournalWriter(str(tmp_path)) as w:
        assert w.last_seq == 9
        w.append([Record.meta(T + 50, G)])
    got = list(JournalReader(str(tmp_path)).records_since(0))
    assert [r.seq for r in got] == list(range(1, 11))
    assert got[-1].kind == "M"


def test_crc_mismatch_detected(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path), roll_bytes=1) as w:
        w.append([Record.data(T + i, G) for i in range(5)])
        w.append([Record.data(T + 10, G)])
    first = list_files(str(tmp_path))[0].path
    data = bytearray(Path(first).read_bytes())
    data[-20] ^= 0xFF  # inside the body of the last record of a sealed file
    Path(first).write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="crc"):
        list(JournalReader(str(tmp_path)).records_since(0))
    assert not JournalReader(str(tmp_path)).coverage(T)


def test_crc_mismatch_in_newest_file_truncates_there(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path)) as w:
        w.append([Record.data(T + i, G) for i in range(5)])
    path = list_files(str(tmp_path))[0].path
    data = bytearray(Path(path).read_bytes())
    data[-20] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with JournalWriter(str(tmp_path)) as w:
        assert w.last_seq == 4


def test_records_since_ts_and_seq(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path), roll_bytes=300) as w:
        for i in range(100):
            w.append([Record.data(T + i * 10, G), Record.meta(T + i * 10, G)])
    r = JournalReader(str(tmp_path))
    assert len(r.files()) > 10
    by_ts = list(r.records_since(T + 500))
    assert by_ts[0].ts == T + 500 and by_ts[0].kind == "D" and len(by_ts) == 100
    by_seq = list(r.records_since(seq=77))
    assert by_seq[0].seq == 77 and by_seq[-1].seq == 200
    assert list(r.records_since(T + 10_000)) == []
    with pytest.raises(ValueError):
        list(r.records_since())


def test_equal_ts_across_a_roll_is_not_skipped(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path), roll_bytes=1) as w:
        w.append([Record.data(T, G)])
        w.append([Record.meta(T, G)])
    assert [x.kind for x in JournalReader(str(tmp_path)).records_since(T)] == ["D", "M"]


def m(kind: str, ts: int) -> Record:
    return Record.marker(kind, ts)


@pytest.mark.parametrize(("events", "since", "covered"), [
    ([m(START, T), Record.data(T + 5, G)], T + 1, True),
    ([m(START, T)], T, True),
    ([m(START, T)], T - 1, False),  # before the recorder started
    ([m(START, T), m(STOP, T + 10)], T + 1, False),  # stopped since
    ([m(START, T), m(STOP, T + 10), m(START, T + 20)], T + 15, False),  # down at since
    ([m(START, T), m(STOP, T + 10), m(START, T + 20)], T + 5, False),  # gap after since
    ([m(START, T), m(STOP, T + 10), m(START, T + 20)], T + 25, True),  # gap before since
    ([m(START, T), m(START, T + 20)], T + 5, False),  # restarted (crash: no STOP)
    ([m(START, T), m(OVERFLOW, T + 20)], T + 5, False),
    ([m(START, T), m(OVERFLOW, T + 20)], T + 20, False),
    ([m(START, T), m(OVERFLOW, T + 20)], T + 21, True),  # lost events were before it
    ([Record.data(T, G)], T + 5, False),  # never started
])
def test_coverage(tmp_path: Path, events: list[Record], since: int, covered: bool) -> None:
    w = JournalWriter(str(tmp_path), roll_bytes=1)  # one file per record: exercises headers
    for e in events:
        w.append([e])
    assert JournalReader(str(tmp_path)).coverage(since) is covered
    w.flush()


def test_coverage_across_writers_and_missing_files(tmp_path: Path) -> None:
    w = JournalWriter(str(tmp_path), roll_bytes=1)
    w.append([m(START, T)])
    for i in range(1, 6):
        w.append([Record.data(T + i * 10, G)])
    r = JournalReader(str(tmp_path))
    assert r.coverage(T + 5)
    os.unlink(r.files()[3].path)  # a hole in the middle
    assert not r.coverage(T + 5)
    assert r.coverage(T + 45)
    w.close()
    assert not r.coverage(T + 45)
    assert not r.coverage(T - 1)  # a journal that starts after since


def test_prune_removes_only_old_whole_files(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path), roll_bytes=1) as w:
        for i in range(10):
            w.append([Record.data(T + i * 1_000_000_000, G)])
    r = JournalReader(str(tmp_path))
    removed = r.prune(T + 6_000_000_000, keep_seconds=2)
    # cutoff T+4s.  A file's records are known older only when the next file starts
    # before the cutoff (ts ties may span a roll): first_ts T..T+2s go, T+3s stays.
    assert len(removed) == 3
    assert r.files()[0].first_seq == 4
    assert r.prune(T + 100_000_000_000) and len(r.files()) == 1  # never the newest


def test_records_since_is_a_stream_with_bounded_memory(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path), fsync="none") as w:
        batch = []
        for i in range(200_000):
            batch.append(Record.entry(T + i, P, b"name-%d" % i))
            if len(batch) == 5000:
                w.append(batch)
                batch = []
    tracemalloc.start()
    try:
        n = 0
        for rec in JournalReader(str(tmp_path)).records_since(0):
            n += 1
            last = rec
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 200_000 and last.name == b"name-199999"
    assert peak < 8 << 20, peak  # the file is ~12 MB; we hold one chunk, not the records
