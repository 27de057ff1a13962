"""Frames: round trips, limits checked before reading, and random input never misbehaving."""

from __future__ import annotations

import io
import os
import struct
import threading
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import FrameReader, ProtocolError, encode_frame, write_frame
from transport.framing import HEADER


def frames_bytes(*frames: tuple[Any, Any]) -> bytes:
    out = b""
    for body, payload in frames:
        out += b"".join(bytes(p) for p in encode_frame(body, payload))
    return out


def reader_of(data: bytes, **kw) -> FrameReader:
    return FrameReader(io.BytesIO(data), **kw)


class Trickle(io.RawIOBase):
    """A raw stream returning at most one byte per read, like a slow pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        chunk = self._data.read(min(len(buf), 1))
        buf[: len(chunk)] = chunk
        return len(chunk)


class CountingBytesIO(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.requested = 0

    def read(self, size: int | None = -1) -> bytes:
        self.requested += size if size and size > 0 else 0
        return super().read(size)


def test_header_layout() -> None:
    parts = encode_frame({"a": 1}, b"xyz")
    head = bytes(parts[0][:12])
    body = msgpack.packb({"a": 1}, use_bin_type=True)
    assert head == b"GR" + b"\0\0" + struct.pack(">I", len(body)) + struct.pack(">I", 3)
    assert bytes(parts[0][12:]) == body
    assert parts[1] == b"xyz"


def test_round_trip_with_payloads_and_non_utf8() -> None:
    name = b"caf\xe9\xff\x00name"
    big = os.urandom(3 << 20)
    frames = [
        ({"t": "q", "id": 1, "a": {"name": name, "gfid": b"\x00" * 16}}, None),
        ({"x": [1, -2, None, True, 1.5, "ü"]}, big),
        ({"xattrs": {b"user.\xfe": b"\x00\x01"}}, memoryview(b"abc")),
        ({}, b""),
    ]
    r = FrameReader(io.BufferedReader(Trickle(frames_bytes(*frames))))
    got = [r.read() for _ in frames]
    assert got[0] == (frames[0][0], None)
    assert got[1] == (frames[1][0], big)
    assert got[2] == (frames[2][0], b"abc")
    assert got[3] == ({}, None)
    assert r.read() is None
    assert r.frames == 4


def test_one_byte_reads_are_reassembled() -> None:
    data = frames_bytes(({"k": b"v" * 100}, b"p" * 50))
    assert FrameReader(Trickle(data)).read() == ({"k": b"v" * 100}, b"p" * 50)


def test_write_frame_over_a_pipe() -> None:
    rfd, wfd = os.pipe()
    payload = os.urandom(1 << 20)  # larger than the pipe buffer: needs a concurrent reader
    with os.fdopen(rfd, "rb", buffering=0) as rf, os.fdopen(wfd, "wb", buffering=0) as wf:
        t = threading.Thread(target=write_frame, args=(wf, encode_frame({"n": 1}, payload)))
        t.start()
        assert FrameReader(rf).read() == ({"n": 1}, payload)
        t.join(10)
        assert not t.is_alive()


@pytest.mark.parametrize("field,limit", [("body", "max_body"), ("payload", "max_payload")])
def test_oversized_lengths_rejected_before_reading(field: str, limit: str) -> None:
    blen, plen = (1000, 0) if field == "body" else (1, 1000)
    stream = CountingBytesIO(HEADER.pack(b"GR", 0, blen, plen) + b"\x80" * 2000)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        FrameReader(stream, **{limit: 999}).read()
    assert stream.requested == HEADER.size


def test_default_limits() -> None:
    with pytest.raises(ProtocolError, match="body of 16777217"):
        reader_of(HEADER.pack(b"GR", 0, (16 << 20) + 1, 0)).read()
    with pytest.raises(ProtocolError, match="payload of 8388609"):
        reader_of(HEADER.pack(b"GR", 0, 1, (8 << 20) + 1)).read()


def test_encode_refuses_what_the_peer_would_reject() -> None:
    with pytest.raises(ProtocolError):
        encode_frame({"x": b"a" * 100}, max_body=50)
    with pytest.raises(ProtocolError):
        encode_frame({}, b"a" * 100, max_payload=50)


def test_bad_magic_and_flags() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        reader_of(b"XX" + frames_bytes(({}, None))[2:]).read()
    with pytest.raises(ProtocolError, match="flags"):
        reader_of(HEADER.pack(b"GR", 1, 1, 0) + b"\x80").read()


@pytest.mark.parametrize("cut", [1, 11, 12, 15, 20])
def test_truncated_frame(cut: int) -> None:
    data = frames_bytes(({"k": "v" * 5}, b"payload!"))
    assert len(data) > 20
    with pytest.raises(ProtocolError, match="middle of a frame"):
        reader_of(data[:cut]).read()


def test_clean_eof_between_frames() -> None:
    r = reader_of(frames_bytes(({"a": 1}, None)))
    assert r.read() == ({"a": 1}, None)
    assert r.read() is None


def test_nesting_depth() -> None:
    ok: object = {}
    for _ in range(14):  # body map + 14 lists + innermost map = 16 levels
        ok = [ok]
    assert reader_of(frames_bytes(({"x": ok}, None))).read() is not None
    deep = [ok]
    with pytest.raises(ProtocolError, match="deeper"):
        reader_of(frames_bytes(({"x": deep}, None))).read()


@pytest.mark.parametrize("body", [[1, 2], 3, b"bin", "str", None])
def test_body_must_be_a_map(body: object) -> None:
    raw = msgpack.packb(body, use_bin_type=True)
    with pytest.raises(ProtocolError, match="not a map"):
        reader_of(HEADER.pack(b"GR", 0, len(raw), 0) + raw).read()


@pytest.mark.parametrize("raw", [
    b"",                                    # empty body
    b"\x81\xa1a",                           # truncated map
    msgpack.packb({"a": 1}) + b"\x01",      # trailing data
    b"\xc1",                                # reserved byte
    b"\x81\xd4\x01\x00\x01",                # ext type
    b"\x81\x91\x01\x01",                    # unhashable (list) key
    b"\x81\xa2\xff\xfe\x01",                # invalid UTF-8 str
])
def test_undecodable_bodies(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        reader_of(HEADER.pack(b"GR", 0, len(raw), 0) + raw).read()


def test_str_limit() -> None:
    raw = msgpack.packb({"s": "x" * 70000})
    with pytest.raises(ProtocolError):
        reader_of(HEADER.pack(b"GR", 0, len(raw), 0) + raw).read()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_protocol_errors(data: bytes) -> None:
    for prefix in (b"", b"GR\0\0"):
        r = reader_of(prefix + data)
        try:
            while r.read() is not None:
                pass
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_random_body_under_valid_header(data: bytes, blen: int, plen: int) -> None:
    r = reader_of(HEADER.pack(b"GR", 0, min(blen, len(data)), plen % 300) + data)
    try:
        r.read()
    except ProtocolError:
        pass


scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=64)
           | st.text(max_size=32) | st.floats(allow_nan=False))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8)
                      | st.integers(-(2**63), 2**64 - 1), inner, max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=10), values, max_size=6),
       st.none() | st.binary(min_size=1, max_size=1000))
def test_round_trip_random_bodies(body: dict, payload: bytes | None) -> None:
    data = frames_bytes((body, payload))
    try:
        got = reader_of(data).read()
    except ProtocolError as exc:
        assert "deeper" in str(exc)
        return
    assert got == (body, payload)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=4), values, max_size=4), st.integers(1, 8))
def test_decode_depth_check_is_check_depth(body: dict, max_depth: int) -> None:
    from transport.framing import check_depth, decode_body

    raw = msgpack.packb(body, use_bin_type=True)
    try:
        check_depth(body, max_depth)
        expected = None
    except ProtocolError as exc:
        expected = str(exc)
    try:
        decode_body(raw, max_depth=max_depth)
        got = None
    except ProtocolError as exc:
        got = str(exc)
    assert got == expected


# -- FileRange payloads (spliced file data) ---------------------------------------------------


def _range_file(tmp_path, data: bytes) -> int:
    p = tmp_path / "src"
    p.write_bytes(data)
    return os.open(p, os.O_RDONLY)


def _send_ranges(writer, fd: int, ranges: list[tuple[int, int]]) -> None:
    from transport import FileRange

    for i, (off, n) in enumerate(ranges):
        write_frame(writer, encode_frame({"i": i}, FileRange(fd, off, n)))
    write_frame(writer, encode_frame({"end": True}))


def _read_all(reader) -> list[tuple[Any, Any]]:
    frames = []
    fr = FrameReader(reader)
    while (f := fr.read()) is not None:
        frames.append(f)
    return frames


def test_file_range_is_spliced_into_a_pipe(tmp_path) -> None:
    data = os.urandom(3 << 20)
    fd = _range_file(tmp_path, data)
    r, w = os.pipe()
    with open(r, "rb", buffering=0) as rf, open(w, "wb", buffering=0) as wf:
        t = threading.Thread(target=lambda: (_send_ranges(wf, fd, [(0, 1 << 20), (5, 2 << 20),
                                                                   (3 << 20, 0)]), wf.close()))
        t.start()
        frames = _read_all(rf)
        t.join(10)
    os.close(fd)
    assert [b for b, _ in frames] == [{"i": 0}, {"i": 1}, {"i": 2}, {"end": True}]
    assert frames[0][1] == data[:1 << 20]
    assert frames[1][1] == data[5:5 + (2 << 20)]
    assert not frames[2][1]


@pytest.mark.parametrize("writer", ["file", "bytesio"])
def test_file_range_without_a_pipe_is_copied(tmp_path, writer: str) -> None:
    data = os.urandom(300_000)
    fd = _range_file(tmp_path, data)
    # splice(2) refuses a regular file as the target, and a BytesIO has no fd: pread path.
    if writer == "file":
        with open(tmp_path / "frames", "wb") as f:
            _send_ranges(f, fd, [(1000, 200_000)])
        raw = (tmp_path / "frames").read_bytes()
    else:
        buf = io.BytesIO()
        _send_ranges(buf, fd, [(1000, 200_000)])
        raw = buf.getvalue()
    os.close(fd)
    frames = _read_all(io.BytesIO(raw))
    assert frames[0] == ({"i": 0}, data[1000:201_000])
    assert frames[1][0] == {"end": True}


def test_a_file_that_shrank_is_padded_and_the_stream_stays_in_step(tmp_path) -> None:
    data = os.urandom(100_000)
    fd = _range_file(tmp_path, data)
    os.truncate(tmp_path / "src", 40_000)    # shorter than the range about to be sent
    r, w = os.pipe()
    with open(r, "rb", buffering=0) as rf, open(w, "wb", buffering=0) as wf:
        t = threading.Thread(target=lambda: (_send_ranges(wf, fd, [(0, 100_000)]), wf.close()))
        t.start()
        frames = _read_all(rf)
        t.join(10)
    os.close(fd)
    assert frames[0][1] == data[:40_000] + bytes(60_000)
    assert frames[1][0] == {"end": True}
