"""georep's transport: framed msgpack request/reply over a byte-stream pair.

The primary talks to the secondary through a :class:`Channel` (pipelined calls, futures,
bounded in-flight requests); the secondary answers through :func:`serve` or a
:class:`ServerConnection`. Every request is checked against its method's schema on receipt
(:func:`validate_request`), and errors cross as ``{type, message, errno}`` rebuilt from a
registry (:func:`register`). See docs/protocol.md.
"""

from .channel import (
    MAGIC,
    PROTOCOL,
    VERSION,
    Channel,
    Request,
    ServerConnection,
    claim_stdio,
    serve,
    spawn_local,
)
from .errors import (
    ConnectionLost,
    HandshakeError,
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
from .framing import (
    MAX_BODY,
    MAX_DEPTH,
    MAX_PAYLOAD,
    FileRange,
    FrameReader,
    encode_frame,
    write_frame,
)
from .schema import METHODS, OPS, PAYLOAD_METHODS, check_op, validate_request

__all__ = [
    "MAGIC", "PROTOCOL", "VERSION", "Channel", "Request", "ServerConnection", "claim_stdio",
    "serve", "spawn_local",
    "ConnectionLost", "HandshakeError", "LockedError", "NotFound", "ProtocolError",
    "RemoteError", "SchemaError", "SecondaryError", "error_from_wire", "error_to_wire",
    "register",
    "MAX_BODY", "MAX_DEPTH", "MAX_PAYLOAD", "FileRange", "FrameReader", "encode_frame",
    "write_frame",
    "METHODS", "OPS", "PAYLOAD_METHODS", "check_op", "validate_request",
]
