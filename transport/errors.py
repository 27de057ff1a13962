"""Error classes of the transport and the registry that rebuilds them across the wire.

An exception raised on the secondary crosses as ``{"type", "message", "errno"}`` and is
rebuilt on the primary from a registry of known classes (borg's habit), so callers can
``except NotFound`` or check ``OSError.errno`` exactly as if the call had been local.
Unknown types come back as a plain :class:`RemoteError` carrying the remote type name.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any, TypeVar

#: Longest message that crosses the wire; the peer's ``max_str_len`` is 64 KiB.
MAX_MESSAGE = 4096
MAX_TYPE = 128


class RemoteError(Exception):
    """Base of georep's error classes; ``type``/``message``/``errno`` are what crosses."""

    def __init__(self, message: str = "", *, errno: int | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.type = type or self.__class__.__name__

    def __str__(self) -> str:
        return self.message


class ProtocolError(RemoteError):
    """The byte stream broke the protocol; the connection can no longer be trusted."""


class HandshakeError(ProtocolError):
    """The peer did not start the conversation as a georep secondary must."""


class ConnectionLost(RemoteError):
    """The connection ended (EOF, protocol error, write failure) before the reply came."""


class SchemaError(RemoteError):
    """A request's arguments do not match its method's schema; answered with an error reply."""


class NotFound(RemoteError):
    """The gfid named by a request is unknown to the secondary."""


class SecondaryError(RemoteError):
    """The secondary failed in a way that is not an OSError (a bug or a broken invariant)."""


class LockedError(RemoteError):
    """Another georep process holds the secondary's lock."""


Factory = Callable[[str, "int | None"], BaseException]
_REGISTRY: dict[str, Factory] = {}

E = TypeVar("E", bound=type[BaseException])


def register(cls: E, *, name: str | None = None, factory: Factory | None = None) -> E:
    """Make ``cls`` rebuildable from the wire under ``name`` (default: its class name).

    Usable as a class decorator. ``factory(message, errno)`` builds the instance; the default
    calls ``cls(message)`` (with ``errno=`` for RemoteError subclasses).
    """
    key = name or cls.__name__
    if factory is None:
        if issubclass(cls, RemoteError):
            def factory(message: str, errno: int | None, _cls: Any = cls) -> BaseException:
                return _cls(message, errno=errno)
        else:
            def factory(message: str, errno: int | None, _cls: Any = cls) -> BaseException:
                exc = _cls(message)
                if errno is not None:
                    exc.errno = errno
                return exc
    _REGISTRY[key] = factory
    return cls


def _oserror(message: str, errno: int | None) -> BaseException:
    # OSError(errno, strerror) returns the matching subclass (FileNotFoundError for ENOENT...).
    if errno is None:
        return OSError(message)
    return OSError(errno, message)


for _cls in (RemoteError, ProtocolError, HandshakeError, ConnectionLost, SchemaError,
             NotFound, SecondaryError, LockedError):
    register(_cls)
register(OSError, factory=_oserror)
for _name in ("ValueError", "TypeError", "KeyError", "RuntimeError", "NotImplementedError",
              "AssertionError"):
    register(getattr(builtins, _name))


def _clean(text: str, limit: int) -> str:
    # Lone surrogates (from undecodable file names) cannot be packed as msgpack str.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """Describe ``exc`` as the ``{"type", "message", "errno"}`` map that crosses the wire."""
    errno: int | None = None
    if isinstance(exc, OSError):
        type_name = "OSError"
        errno = exc.errno if isinstance(exc.errno, int) else None
        message = exc.strerror if errno is not None and exc.strerror else str(exc)
        if errno is not None and isinstance(exc.filename, str | bytes):
            # (an int filename is the fd of an os call on a descriptor: noise to a reader)
            message = f"{message}: {exc.filename!r}"
    elif isinstance(exc, RemoteError):
        type_name, message = exc.type, exc.message
        errno = exc.errno if isinstance(exc.errno, int) else None
    else:
        type_name = exc.__class__.__name__
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return {"type": _clean(type_name, MAX_TYPE), "message": _clean(message, MAX_MESSAGE),
            "errno": errno}


def error_from_wire(wire: Any) -> BaseException:
    """Rebuild the exception described by a wire error map; unknown types give RemoteError.

    A malformed map gives a :class:`ProtocolError` (returned, not raised).
    """
    if not isinstance(wire, dict):
        return ProtocolError(f"malformed error in reply: {wire!r:.100}")
    type_name, message, errno = wire.get("type"), wire.get("message"), wire.get("errno")
    if (not isinstance(type_name, str) or not isinstance(message, str)
            or not (errno is None or (isinstance(errno, int) and not isinstance(errno, bool)))):
        return ProtocolError(f"malformed error in reply: {wire!r:.100}")
    factory = _REGISTRY.get(type_name)
    if factory is None:
        return RemoteError(message, errno=errno, type=type_name)
    try:
        return factory(message, errno)
    except Exception:
        return RemoteError(message, errno=errno, type=type_name)
