"""Length-prefixed frames: a 12-byte header, a msgpack body and an optional raw payload.

Lengths are checked against limits before anything is read, so a hostile or corrupted
stream cannot make us allocate or wait for gigabytes; every violation is a
:class:`ProtocolError` (fatal for the connection, because the stream is out of sync).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, BinaryIO, Protocol

import msgpack

from .errors import ProtocolError

FRAME_MAGIC = b"GR"
HEADER = struct.Struct(">2sHII")
MAX_BODY = 16 << 20
MAX_PAYLOAD = 8 << 20
MAX_DEPTH = 16

Buffer = bytes | bytearray | memoryview


class FileRange:
    """A payload that is ``length`` bytes of the open file ``fd`` from ``offset``.

    :func:`write_frame` moves it with ``splice(2)`` (page cache to pipe, no copy through
    Python) when the writer is a pipe, and by ``pread`` otherwise.  A file that is
    shorter than the range by then is padded with zeros, so the frame stays whole; the
    sender notices the change (size, mtime, ctime) and does not finish that file.
    """

    __slots__ = ("fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError("a file range needs a non-negative offset and length")
        self.fd, self.offset, self.length = fd, offset, length

    def __len__(self) -> int:
        return self.length


Payload = Buffer | FileRange


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes | None: ...


def encode_frame(body: dict[str, Any], payload: Payload | None = None, *,
                 max_body: int = MAX_BODY, max_payload: int = MAX_PAYLOAD) -> list[Payload]:
    """Pack one frame as a list of buffers for a single ``writelines``/``os.writev``.

    The payload is passed through uncopied. Raises ProtocolError (nothing has been written)
    when the frame would break the limits the peer enforces, TypeError/ValueError when the
    body holds something msgpack cannot pack.
    """
    packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > max_body:
        raise ProtocolError(f"frame body of {len(packed)} bytes exceeds the limit of {max_body}")
    plen = (0 if payload is None else payload.length if isinstance(payload, FileRange)
            else memoryview(payload).nbytes)
    if plen > max_payload:
        raise ProtocolError(f"frame payload of {plen} bytes exceeds the limit of {max_payload}")
    head = HEADER.pack(FRAME_MAGIC, 0, len(packed), plen) + packed
    if not plen:
        return [head]
    assert payload is not None
    return [head, payload]


def encode_message(body: dict[str, Any], *, max_body: int = MAX_BODY) -> bytes:
    """One frame without a payload, as bytes (the control sockets' messages)."""
    head = encode_frame(body, max_body=max_body)[0]
    assert isinstance(head, bytes)
    return head


def write_frame(writer: BinaryIO, parts: list[Payload]) -> int:
    """Write all of ``parts`` (raw files may write partially) and flush; return bytes written."""
    total = 0
    for part in parts:
        if isinstance(part, FileRange):
            writer.flush()
            total += _write_range(writer, part)
            continue
        total += _write_all(writer, memoryview(part).cast("B"))
    writer.flush()
    return total


def _write_all(writer: BinaryIO, view: memoryview) -> int:
    total = 0
    while view:
        n = writer.write(view)
        if n is None:  # non-blocking raw file with a full pipe: not supported
            raise BlockingIOError("writer would block")
        view = view[n:]
        total += n
    return total


def _write_range(writer: BinaryIO, r: FileRange) -> int:
    off, left = r.offset, r.length
    try:
        out: int | None = writer.fileno()
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        out = None
    while left and out is not None:
        try:
            n = os.splice(r.fd, out, left, offset_src=off)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            out = None  # not a pipe (or no splice for this file): copy through Python
            break
        if n == 0:
            break  # the file is shorter now
        off += n
        left -= n
    while left and out is None:
        data = os.pread(r.fd, min(left, 1 << 20), off)
        if not data:
            break  # the file is shorter now
        _write_all(writer, memoryview(data))
        off += len(data)
        left -= len(data)
    while left:  # keep the frame whole: zeros for what the file no longer has
        n = min(left, 1 << 20)
        _write_all(writer, memoryview(bytes(n)))
        left -= n
    return r.length


def check_depth(obj: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise ProtocolError if containers in ``obj`` nest deeper than ``max_depth``."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise ProtocolError(f"frame body nests deeper than {max_depth} levels")
        if isinstance(item, dict):
            children: Any = (*item.keys(), *item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _nests_deeper(obj: dict[Any, Any] | list[Any], room: int) -> bool:
    # check_depth for what msgpack decodes: containers are plain dicts and lists, and a map
    # key is never one (unhashable), so only values need a look.  Recursion is bounded by
    # ``room``; about three times faster than the general walk on an ops batch.
    if room <= 0:
        return True
    room -= 1
    for v in (obj.values() if isinstance(obj, dict) else obj):
        if isinstance(v, (dict, list)) and _nests_deeper(v, room):
            return True
    return False


def decode_body(raw: bytes, *, max_depth: int = MAX_DEPTH) -> dict[Any, Any]:
    """Unpack a frame body with the protocol's limits; it must be a map."""
    try:
        body = msgpack.unpackb(
            raw, raw=False, use_list=True, strict_map_key=False, max_str_len=65536,
            max_bin_len=16 << 20, max_array_len=1_000_000, max_map_len=1_000_000,
            max_ext_len=0)
    except Exception as exc:
        raise ProtocolError(f"undecodable frame body: {type(exc).__name__}: {exc}"[:300])
    if not isinstance(body, dict):
        raise ProtocolError(f"frame body is a {type(body).__name__}, not a map")
    if max_depth > 64:
        check_depth(body, max_depth)
    elif _nests_deeper(body, max_depth):
        raise ProtocolError(f"frame body nests deeper than {max_depth} levels")
    return body


class FrameReader:
    """Read frames from a binary file; ``read()`` gives ``(body, payload or None)`` or None."""

    def __init__(self, readable: Readable, *, max_body: int = MAX_BODY,
                 max_payload: int = MAX_PAYLOAD, max_depth: int = MAX_DEPTH) -> None:
        self._f = readable
        self.max_body = max_body
        self.max_payload = max_payload
        self.max_depth = max_depth
        self.frames = 0
        self.bytes = 0

    def _read_exact(self, size: int, *, at_start: bool = False) -> bytes | None:
        chunks: list[bytes] = []
        got = 0
        while got < size:
            chunk = self._f.read(size - got)
            if not chunk:
                if at_start and got == 0:
                    return None
                raise ProtocolError("connection closed in the middle of a frame")
            chunks.append(chunk)
            got += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read(self) -> tuple[dict[Any, Any], bytes | None] | None:
        """Read one frame; None on a clean EOF between frames, ProtocolError on any violation."""
        head = self._read_exact(HEADER.size, at_start=True)
        if head is None:
            return None
        magic, flags, blen, plen = HEADER.unpack(head)
        if magic != FRAME_MAGIC:
            raise ProtocolError(f"bad frame magic {magic!r}")
        if flags != 0:
            raise ProtocolError(f"unknown frame flags {flags:#x}")
        if blen > self.max_body:
            raise ProtocolError(f"frame body of {blen} bytes exceeds the limit of {self.max_body}")
        if plen > self.max_payload:
            raise ProtocolError(
                f"frame payload of {plen} bytes exceeds the limit of {self.max_payload}")
        raw = self._read_exact(blen) if blen else b""
        assert raw is not None
        payload = self._read_exact(plen) if plen else None
        body = decode_body(raw, max_depth=self.max_depth)
        self.frames += 1
        self.bytes += HEADER.size + blen + plen
        return body, payload
