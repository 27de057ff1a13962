"""The error registry: errors cross as {type, message, errno} and come back as their class."""

from __future__ import annotations

import errno
import os

import msgpack

from transport import (
    ConnectionLost,
    LockedError,
    NotFound,
    ProtocolError,
    RemoteError,
    SchemaError,
    SecondaryError,
    error_from_wire,
    error_to_wire,
    register,
)


def through_wire(exc: BaseException) -> BaseException:
    wire = msgpack.unpackb(msgpack.packb(error_to_wire(exc), use_bin_type=True), raw=False)
    return error_from_wire(wire)


def test_known_classes_round_trip() -> None:
    for cls in (ProtocolError, SchemaError, NotFound, SecondaryError, LockedError,
                ConnectionLost):
        back = through_wire(cls("boom", errno=5))
        assert type(back) is cls
        assert back.message == "boom" and back.errno == 5 and str(back) == "boom"


def test_oserror_keeps_errno_and_subclass() -> None:
    back = through_wire(FileNotFoundError(errno.ENOENT, "No such file", b"caf\xe9"))
    assert isinstance(back, FileNotFoundError)
    assert back.errno == errno.ENOENT
    assert "caf" in str(back)
    back = through_wire(OSError(errno.EXDEV, "cross-device"))
    assert type(back) is OSError and back.errno == errno.EXDEV


def test_oserror_on_a_descriptor_does_not_name_the_fd() -> None:
    fd = os.open("/", os.O_PATH)
    try:
        os.listdir(fd)  # EBADF, and the exception's filename is the fd number
    except OSError as e:
        assert isinstance(e.filename, int)
        back = through_wire(e)
    finally:
        os.close(fd)
    assert back.errno == errno.EBADF
    assert back.strerror == os.strerror(errno.EBADF), str(back)  # not "...: 7"


def test_builtin_and_unknown_types() -> None:
    assert type(through_wire(ValueError("bad"))) is ValueError

    class Weird(Exception):
        pass

    back = through_wire(Weird("odd\nline"))
    assert type(back) is RemoteError
    assert back.type == "Weird" and back.message == "odd line"


def test_register_custom_class() -> None:
    @register
    class StaleGfid(RemoteError):
        pass

    back = through_wire(StaleGfid("gone", errno=errno.ESTALE))
    assert isinstance(back, StaleGfid) and back.errno == errno.ESTALE


def test_unpackable_message_is_cleaned_and_bounded() -> None:
    wire = error_to_wire(ValueError("\udcff" + "x" * 10000))
    assert len(wire["message"]) <= 4096
    msgpack.packb(wire, use_bin_type=True)


def test_malformed_wire_error() -> None:
    assert isinstance(error_from_wire("nope"), ProtocolError)
    assert isinstance(error_from_wire({"type": 1, "message": "m", "errno": None}), ProtocolError)
    assert isinstance(error_from_wire({"type": "X", "message": "m", "errno": "2"}), ProtocolError)
