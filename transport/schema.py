"""One declarative schema per method, checked on receipt on both the in-process and wire paths.

A request that breaks its schema is answered with a :class:`SchemaError` reply (the
connection stays up). An ``ops`` batch is checked as a whole before anything is applied:
one bad op rejects the entire request, naming the index of the first bad op, so a batch is
never half-applied because of a malformed item.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .errors import SchemaError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX = 2**32 - 1
GFID_LEN = 16
NAME_MAX = 255
PATH_MAX = 4095
XATTR_VALUE_MAX = 64 << 10
INLINE_DATA_MAX = 1 << 20
MAX_OPS = 100_000
#: Largest data_sigs block (the secondary reads a whole block into memory at once) and most
#: blocks per data_sigs request (16 bytes of reply each; the primary asks for <= 65,536).
MAX_BLOCK = 8 << 20
MAX_SIGS = 1 << 19
ENTRY_TYPES = frozenset("fdlpcbs")

Check = Callable[[Any], str | None]
"""A field check returns None when the value is valid, else a short reason."""


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass and is never a valid count


def int_range(lo: int, hi: int) -> Check:
    """Check an int within ``[lo, hi]``."""
    def check(v: Any) -> str | None:
        if not _is_int(v):
            return f"must be an int, not {type(v).__name__}"
        if not lo <= v <= hi:
            return f"must be in {lo}..{hi}"
        return None
    return check


def bytes_len(lo: int, hi: int, *, no_nul: bool = False) -> Check:
    """Check bytes of length ``lo..hi`` (optionally without NUL)."""
    def check(v: Any) -> str | None:
        if type(v) is not bytes:
            return f"must be bytes, not {type(v).__name__}"
        if not lo <= len(v) <= hi:
            return f"must be {lo}..{hi} bytes long, not {len(v)}"
        if no_nul and b"\0" in v:
            return "must not contain NUL"
        return None
    return check


def str_len(lo: int, hi: int) -> Check:
    """Check a str of length ``lo..hi``."""
    def check(v: Any) -> str | None:
        if type(v) is not str:
            return f"must be a str, not {type(v).__name__}"
        if not lo <= len(v) <= hi:
            return f"must be {lo}..{hi} characters long"
        return None
    return check


uint63 = int_range(0, INT64_MAX)
positive = int_range(1, INT64_MAX)
int64 = int_range(INT64_MIN, INT64_MAX)
gfid = bytes_len(GFID_LEN, GFID_LEN)
target = bytes_len(1, PATH_MAX, no_nul=True)
inline_data = bytes_len(0, INLINE_DATA_MAX)


def name(v: Any) -> str | None:
    """A single path component: bytes 1..255, no ``/`` or NUL, not ``.`` or ``..``."""
    if type(v) is not bytes:
        return f"must be bytes, not {type(v).__name__}"
    if not 1 <= len(v) <= NAME_MAX:
        return f"must be 1..{NAME_MAX} bytes long, not {len(v)}"
    if b"/" in v or b"\0" in v:
        return "must not contain '/' or NUL"
    if v in (b".", b".."):
        return "must not be '.' or '..'"
    return None


def entry_type(v: Any) -> str | None:
    """One of the wire entry types ``f d l p c b s``."""
    if type(v) is not str or v not in ENTRY_TYPES:
        return f"must be one of {''.join(sorted(ENTRY_TYPES))!r}, not {v!r:.40}"
    return None


_xattr_name = bytes_len(1, NAME_MAX, no_nul=True)
_xattr_value = bytes_len(0, XATTR_VALUE_MAX)


def xattrs(v: Any) -> str | None:
    """A map of xattr name (bytes 1..255, no NUL) to value (bytes up to 64 KiB)."""
    if type(v) is not dict:
        return f"must be a map, not {type(v).__name__}"
    for key, value in v.items():
        why = _xattr_name(key)
        if why:
            return f"xattr name {key!r:.60} {why}"
        why = _xattr_value(value)
        if why:
            return f"xattr {key!r:.60} value {why}"
    return None


META_FIELDS: dict[str, Check] = {
    "mode": int_range(0, 0o7777),
    "uid": int_range(0, UINT32_MAX),
    "gid": int_range(0, UINT32_MAX),
    "atime": int64,
    "mtime": int64,
    "xattrs": xattrs,
}


def meta(v: Any) -> str | None:
    """Metadata to apply: any subset of mode, uid, gid, atime, mtime (ns), xattrs."""
    if type(v) is not dict:
        return f"must be a map, not {type(v).__name__}"
    return _fields(v, {}, META_FIELDS)


class Shape:
    """Named fields of a map: required and optional checks; anything else is rejected."""

    def __init__(self, required: Mapping[str, Check],
                 optional: Mapping[str, Check] | None = None,
                 extra: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        self.required = dict(required)
        self.optional = dict(optional or {})
        self.extra = extra

    def check(self, value: dict[Any, Any]) -> str | None:
        """Return None when ``value`` fits, else a one-line reason."""
        why = _fields(value, self.required, self.optional)
        if why is None and self.extra is not None:
            why = self.extra(value)
        return why


def _fields(value: dict[Any, Any], required: Mapping[str, Check],
            optional: Mapping[str, Check]) -> str | None:
    for key in value:
        if key not in required and key not in optional:
            return f"unknown field {key!r:.60}"
    for key in required:
        if key not in value:
            return f"missing field {key!r}"
    for key, v in value.items():
        check = required.get(key) or optional[key]
        why = check(v)
        if why:
            return f"field {key!r}: {why}"
    return None


def _ensure_extra(op: dict[str, Any]) -> str | None:
    # The fields that only make sense for one type must come with it, so the applier can
    # create the object from the op alone.
    t = op["type"]
    if ("target" in op) != (t == "l"):
        return "'target' is required for a symlink and only allowed for one"
    if ("rdev" in op) != (t in ("c", "b")):
        return "'rdev' is required for a device and only allowed for one"
    if "data" in op and t != "f":
        return "'data' is only allowed for a regular file"
    return None


OPS: dict[str, Shape] = {
    "ensure": Shape(
        {"op": str_len(1, 16), "pgfid": gfid, "name": name, "gfid": gfid, "type": entry_type},
        {"meta": meta, "target": target, "rdev": uint63, "data": inline_data},
        extra=_ensure_extra),
    "delete": Shape({"op": str_len(1, 16), "pgfid": gfid, "name": name, "gfid": gfid}),
    "rename": Shape({"op": str_len(1, 16), "gfid": gfid, "pgfid": gfid, "name": name,
                     "npgfid": gfid, "nname": name, "type": entry_type}),
    "meta": Shape({"op": str_len(1, 16), "gfid": gfid, "meta": meta}),
}


# -- fast path for the hot op ---------------------------------------------------------------
#
# A first sync sends one ``ensure`` per object and every one is checked on receipt (and before
# sending).  _ensure_ok is the same check as OPS["ensure"] written out flat: it only ever says
# "valid" for an op the generic check accepts, and anything it does not accept goes through
# the generic check, which gives the reason.  So both reject exactly the same ops
# (tests/transport/test_schema.py compares them on random ops).

_ENSURE_REQUIRED = frozenset(OPS["ensure"].required)
_ENSURE_ALLOWED = _ENSURE_REQUIRED | frozenset(OPS["ensure"].optional)
_META_INT_RANGES: dict[str, tuple[int, int]] = {
    "mode": (0, 0o7777), "uid": (0, UINT32_MAX), "gid": (0, UINT32_MAX),
    "atime": (INT64_MIN, INT64_MAX), "mtime": (INT64_MIN, INT64_MAX),
}
assert frozenset(_META_INT_RANGES) | {"xattrs"} == frozenset(META_FIELDS)


def _meta_ok(m: dict[Any, Any]) -> bool:
    ranges = _META_INT_RANGES
    for key, v in m.items():
        if key == "xattrs":
            if type(v) is not dict:
                return False
            for xk, xv in v.items():
                if (type(xk) is not bytes or not 0 < len(xk) <= NAME_MAX or b"\0" in xk
                        or type(xv) is not bytes or len(xv) > XATTR_VALUE_MAX):
                    return False
        else:
            r = ranges.get(key) if type(key) is str else None
            if r is None or type(v) is not int or not r[0] <= v <= r[1]:
                return False
    return True


def _ensure_ok(op: dict[Any, Any]) -> bool:
    """True only when ``op`` (whose ``op`` equals ``"ensure"``) fits OPS["ensure"]."""
    keys = op.keys()
    if not (keys >= _ENSURE_REQUIRED and keys <= _ENSURE_ALLOWED) or type(op["op"]) is not str:
        return False
    g = op["pgfid"]
    if type(g) is not bytes or len(g) != GFID_LEN:
        return False
    g = op["gfid"]
    if type(g) is not bytes or len(g) != GFID_LEN:
        return False
    n = op["name"]
    if (type(n) is not bytes or not 0 < len(n) <= NAME_MAX or b"/" in n or b"\0" in n
            or n == b"." or n == b".."):
        return False
    t = op["type"]
    if type(t) is not str or t not in ENTRY_TYPES:
        return False
    if "meta" in keys:
        m = op["meta"]
        if type(m) is not dict or not _meta_ok(m):
            return False
    if "data" in keys:
        d = op["data"]
        if t != "f" or type(d) is not bytes or len(d) > INLINE_DATA_MAX:
            return False
    if ("target" in keys) != (t == "l") or ("rdev" in keys) != (t in ("c", "b")):
        return False
    if t == "l":
        v = op["target"]
        if type(v) is not bytes or not 0 < len(v) <= PATH_MAX or b"\0" in v:
            return False
    elif t in ("c", "b"):
        v = op["rdev"]
        if type(v) is not int or not 0 <= v <= INT64_MAX:
            return False
    return True


def check_op(op: Any) -> str | None:
    """Return None when ``op`` is a valid entry/meta op map, else a one-line reason."""
    if type(op) is not dict:
        return f"must be a map, not {type(op).__name__}"
    kind = op.get("op")
    if kind == "ensure" and _ensure_ok(op):
        return None
    shape = OPS.get(kind) if type(kind) is str else None
    if shape is None:
        return f"unknown op {kind!r:.40}"
    why = shape.check(op)
    return f"{kind}: {why}" if why else None


def ops_list(v: Any) -> str | None:
    """A batch of up to 100,000 ops; the first bad op fails the whole batch."""
    if type(v) is not list:
        return f"must be a list, not {type(v).__name__}"
    if len(v) > MAX_OPS:
        return f"holds {len(v)} ops, more than {MAX_OPS}"
    ok = _ensure_ok
    for index, op in enumerate(v):
        if type(op) is dict and op.get("op") == "ensure" and ok(op):
            continue
        why = check_op(op)
        if why:
            return f"op {index}: {why}"
    return None


def boolean(v: Any) -> str | None:
    """A msgpack boolean."""
    return None if type(v) is bool else f"must be a boolean, not {type(v).__name__}"


def list_of(item: Check, noun: str) -> Check:
    """A list of up to 100,000 values, each passing ``item``."""

    def check(v: Any) -> str | None:
        if type(v) is not list:
            return f"must be a list, not {type(v).__name__}"
        if len(v) > MAX_OPS:
            return f"holds {len(v)} {noun}, more than {MAX_OPS}"
        for index, x in enumerate(v):
            why = item(x)
            if why:
                return f"item {index}: {why}"
        return None

    return check


#: Up to 100,000 gfids.
gfid_list = list_of(gfid, "gfids")
#: Up to 100,000 entry names (each a valid single path component).
name_list = list_of(name, "names")


def _sigs_extra(a: dict[str, Any]) -> str | None:
    if -(-a["length"] // a["block"]) > MAX_SIGS:
        return f"asks for more than {MAX_SIGS} block signatures"
    return None


def xattr_scope(v: Any) -> str | None:
    """Which xattrs the session replicates: all, xattrs (no ACLs), acls or none."""
    if v not in ("all", "xattrs", "acls", "none"):
        return f"must be all, xattrs, acls or none, not {v!r:.40}"
    return None


METHODS: dict[str, Shape] = {
    # The optional fields identify the primary for the secondary's session lock.
    "hello": Shape({"version": str_len(0, 256), "protocol": uint63},
                   {"session": str_len(1, 256), "primary": str_len(0, PATH_MAX),
                    "host": str_len(0, 256), "force": boolean,
                    # Session settings the host applies (config keys, docs/config.md).
                    "xattrs": xattr_scope, "idle_timeout": int_range(1, 1 << 31)}),
    "ops": Shape({"ops": ops_list}),
    # ``names``: only these entries (missing ones are left out), not the whole directory.
    "list_dir": Shape({"gfid": gfid}, {"ordered": boolean, "names": name_list}),
    "stat_gfid": Shape({"gfid": gfid}),
    "lookup": Shape({"gfids": gfid_list}),
    "data_sigs": Shape({"gfid": gfid, "offset": uint63, "length": uint63,
                        "block": int_range(1, MAX_BLOCK)}, extra=_sigs_extra),
    "data_write": Shape({"gfid": gfid, "offset": uint63}),
    "data_hole": Shape({"gfid": gfid, "offset": uint63, "length": uint63}),
    "data_finish": Shape({"gfid": gfid, "size": uint63, "meta": meta}),
    "end_crawl": Shape({}),
    "commit": Shape({}),
    "ping": Shape({}),
    #: The secondary host's actors and resources, for the inspection shell.
    "inspect": Shape({}),
    # Safety stop: how many objects the secondary holds (recursive, .georep excluded).
    "count": Shape({}, {"limit": uint63}),
}

#: Methods whose request may carry a raw payload (file data).
PAYLOAD_METHODS = frozenset({"data_write"})


def validate_request(method: str, args: Any, payload: Any = None) -> None:
    """Raise SchemaError (one line) unless ``method(**args)`` fits the method's schema.

    ``payload`` is only allowed for the methods in :data:`PAYLOAD_METHODS`.
    """
    shape = METHODS.get(method) if type(method) is str else None
    if shape is None:
        raise SchemaError(f"unknown method {method!r:.60}")
    if type(args) is not dict:
        raise SchemaError(f"{method}: arguments must be a map, not {type(args).__name__}")
    why = shape.check(args)
    if why:
        raise SchemaError(f"{method}: {why}")
    if payload is not None and method not in PAYLOAD_METHODS:
        raise SchemaError(f"{method}: takes no payload")
