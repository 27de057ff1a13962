"""Per-method and per-op schemas: valid requests pass, each kind of bad field is named."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import METHODS, SchemaError, check_op, validate_request

G1, G2, G3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
META = {"mode": 0o4755, "uid": 1000, "gid": 2**32 - 1, "atime": -5, "mtime": 2**63 - 1,
        "xattrs": {b"user.a": b"", b"system.posix_acl_access": b"\x02" * 100}}

VALID_ARGS: dict[str, dict[str, Any]] = {
    "hello": {"version": "0.1.0", "protocol": 1},
    "ops": {"ops": []},
    "list_dir": {"gfid": G1},
    "stat_gfid": {"gfid": G1},
    "lookup": {"gfids": [G1, G1]},
    "count": {"limit": 1000},
    "data_sigs": {"gfid": G1, "offset": 0, "length": 64 << 20, "block": 1 << 17},
    "data_write": {"gfid": G1, "offset": 4096},
    "data_hole": {"gfid": G1, "offset": 0, "length": 10},
    "data_finish": {"gfid": G1, "size": 0, "meta": META},
    "end_crawl": {},
    "commit": {},
    "ping": {},
    "inspect": {},
}

VALID_OPS: list[dict[str, Any]] = [
    {"op": "ensure", "pgfid": G1, "name": b"caf\xe9", "gfid": G2, "type": "f"},
    {"op": "ensure", "pgfid": G1, "name": b"f", "gfid": G2, "type": "f", "meta": META,
     "data": b"x" * (1 << 20)},
    {"op": "ensure", "pgfid": G1, "name": b"l", "gfid": G2, "type": "l", "target": b"../x"},
    {"op": "ensure", "pgfid": G1, "name": b"c", "gfid": G2, "type": "c", "rdev": 0x0501},
    {"op": "ensure", "pgfid": G1, "name": b"d", "gfid": G2, "type": "d", "meta": {}},
    {"op": "ensure", "pgfid": G1, "name": b"p", "gfid": G2, "type": "p"},
    {"op": "ensure", "pgfid": G1, "name": b"s", "gfid": G2, "type": "s"},
    {"op": "delete", "pgfid": G1, "name": b"n" * 255, "gfid": G2},
    {"op": "rename", "gfid": G2, "pgfid": G1, "name": b"a", "npgfid": G3, "nname": b"b",
     "type": "d"},
    {"op": "meta", "gfid": G2, "meta": {"mode": 0o644}},
]


def test_allowlist_is_the_documented_one() -> None:
    assert set(METHODS) == set(VALID_ARGS)


@pytest.mark.parametrize("method", sorted(VALID_ARGS))
def test_valid_requests(method: str) -> None:
    validate_request(method, VALID_ARGS[method])


def test_payload_only_for_data_write() -> None:
    validate_request("data_write", VALID_ARGS["data_write"], b"data")
    with pytest.raises(SchemaError, match="payload"):
        validate_request("ping", {}, b"data")


def test_valid_ops_batch() -> None:
    validate_request("ops", {"ops": VALID_OPS})


@pytest.mark.parametrize("method,args,match", [
    ("frobnicate", {}, "unknown method"),
    ("__init__", {}, "unknown method"),
    ("ping", [], "must be a map"),
    ("ping", {"x": 1}, "unknown field 'x'"),
    ("list_dir", {}, "missing field 'gfid'"),
    ("list_dir", {"gfid": b"\x01" * 15}, "16..16 bytes"),
    ("list_dir", {"gfid": "0" * 16}, "must be bytes"),
    ("data_write", {"gfid": G1, "offset": -1}, "0..9223372036854775807"),
    ("data_write", {"gfid": G1, "offset": 2**63}, "must be in"),
    ("data_write", {"gfid": G1, "offset": True}, "not bool"),
    ("data_write", {"gfid": G1, "offset": 1.0}, "not float"),
    ("data_sigs", {"gfid": G1, "offset": 0, "length": 1, "block": 0}, "'block'"),
    ("hello", {"version": b"1", "protocol": 1}, "must be a str"),
    ("data_finish", {"gfid": G1, "size": 1, "meta": {"mode": 0o10000}}, "mode"),
    ("data_finish", {"gfid": G1, "size": 1, "meta": {"uid": 2**32}}, "uid"),
    ("data_finish", {"gfid": G1, "size": 1, "meta": {"mtime": 2**63}}, "mtime"),
    ("data_finish", {"gfid": G1, "size": 1, "meta": {"size": 1}}, "unknown field 'size'"),
    ("data_finish", {"gfid": G1, "size": 1, "meta": {"xattrs": {"user.a": b""}}}, "xattr"),
    ("data_finish", {"gfid": G1, "size": 1, "meta": {"xattrs": {b"": b""}}}, "xattr"),
    ("data_finish", {"gfid": G1, "size": 1, "meta": {"xattrs": {b"a\0": b""}}}, "NUL"),
    ("data_finish", {"gfid": G1, "size": 1, "meta": {"xattrs": {b"a": b"v" * 65537}}},
     "xattr"),
    ("data_finish", {"gfid": G1, "size": 1, "meta": {"xattrs": []}}, "must be a map"),
    ("ops", {"ops": {}}, "must be a list"),
    ("ops", {"ops": [{}] * 100_001}, "more than 100000"),
])
def test_invalid_requests(method: str, args: Any, match: str) -> None:
    with pytest.raises(SchemaError, match=match) as info:
        validate_request(method, args)
    assert "\n" not in str(info.value)


def with_(op: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**op, **changes}
    return {k: v for k, v in out.items() if v is not DROP}


DROP = object()
ENSURE, DELETE, RENAME, META_OP = VALID_OPS[0], VALID_OPS[7], VALID_OPS[8], VALID_OPS[9]


@pytest.mark.parametrize("op,match", [
    ("nope", "must be a map"),
    ({"op": "chmod", "gfid": G1}, "unknown op"),
    ({"gfid": G1}, "unknown op None"),
    (with_(ENSURE, name=b""), "'name'"),
    (with_(ENSURE, name=b"."), "'.' or '..'"),
    (with_(ENSURE, name=b".."), "'.' or '..'"),
    (with_(ENSURE, name=b"a/b"), "'/' or NUL"),
    (with_(ENSURE, name=b"a\0b"), "'/' or NUL"),
    (with_(ENSURE, name=b"n" * 256), "1..255"),
    (with_(ENSURE, name="str"), "must be bytes"),
    (with_(ENSURE, pgfid=b"short"), "'pgfid'"),
    (with_(ENSURE, gfid=DROP), "missing field 'gfid'"),
    (with_(ENSURE, type="x"), "'type'"),
    (with_(ENSURE, type="ff"), "'type'"),
    (with_(ENSURE, extra=1), "unknown field 'extra'"),
    (with_(ENSURE, data=b"x" * ((1 << 20) + 1)), "'data'"),
    (with_(ENSURE, type="d", data=b"x"), "only allowed for a regular file"),
    (with_(ENSURE, type="l"), "'target' is required"),
    (with_(ENSURE, target=b"x"), "'target' is required"),
    (with_(ENSURE, type="l", target=b""), "'target'"),
    (with_(ENSURE, type="l", target=b"a\0"), "NUL"),
    (with_(ENSURE, type="l", target=b"a" * 4096), "'target'"),
    (with_(ENSURE, type="b"), "'rdev' is required"),
    (with_(ENSURE, type="b", rdev=-1), "'rdev'"),
    (with_(ENSURE, meta={"mode": "755"}), "'meta'"),
    (with_(DELETE, type="f"), "unknown field 'type'"),
    (with_(DELETE, name=DROP), "missing field 'name'"),
    (with_(RENAME, nname=b".."), "'nname'"),
    (with_(RENAME, npgfid=DROP), "missing field 'npgfid'"),
    (with_(RENAME, type=DROP), "missing field 'type'"),
    (with_(META_OP, meta=DROP), "missing field 'meta'"),
    (with_(META_OP, meta={"gid": -1}), "gid"),
])
def test_invalid_ops(op: Any, match: str) -> None:
    assert check_op(op) is not None
    with pytest.raises(SchemaError, match=match):
        validate_request("ops", {"ops": [*VALID_OPS, op]})


def test_first_bad_op_rejects_the_whole_batch_by_index() -> None:
    bad = with_(ENSURE, name=b"/")
    batch = [ENSURE, DELETE, bad, with_(META_OP, meta=None)]
    with pytest.raises(SchemaError, match=r"^ops: field 'ops': op 2: ensure: field 'name'"):
        validate_request("ops", {"ops": batch})


keys = st.sampled_from(["gfid", "pgfid", "name", "type", "op", "meta", "offset", "ops",
                        "version", "protocol", "size", "x"]) | st.text(max_size=4)
leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
          | st.binary(max_size=20) | st.sampled_from([G1, b"name", "f", "ensure", "meta"]))
anything = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(keys | st.binary(max_size=3) | st.integers(), inner, max_size=6),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(VALID_ARGS)) | st.text(max_size=6),
       st.dictionaries(keys, anything, max_size=6) | anything,
       st.none() | st.binary(max_size=4))
def test_random_requests_only_schema_errors(method: str, args: Any, payload: Any) -> None:
    try:
        validate_request(method, args, payload)
    except SchemaError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(keys, anything, max_size=7) | anything, max_size=5))
def test_random_ops_only_schema_errors(ops: list[Any]) -> None:
    try:
        validate_request("ops", {"ops": ops})
    except SchemaError:
        pass


# -- the ensure fast path accepts exactly what the generic check accepts -------------------

def _generic_check_op(op: Any) -> str | None:
    """check_op without the fast path: the declarative OPS shape alone."""
    from transport.schema import OPS

    if type(op) is not dict:
        return f"must be a map, not {type(op).__name__}"
    kind = op.get("op")
    shape = OPS.get(kind) if type(kind) is str else None
    if shape is None:
        return f"unknown op {kind!r:.40}"
    why = shape.check(op)
    return f"{kind}: {why}" if why else None


class _Str(str):
    pass


_field_values = (
    st.sampled_from([G1, G2, b"\x01" * 15, b"\x01" * 17, b"", b".", b"..", b"a/b", b"a\0b",
                     b"n" * 255, b"n" * 256, b"../x", "f", "d", "l", "c", "b", "p", "s", "x",
                     "", "ensure", _Str("ensure"), _Str("f"), 0, -1, 0x0501, 2**63 - 1,
                     2**63, True, None, b"x" * (1 << 20), b"x" * ((1 << 20) + 1), {}, [],
                     b"t" * 4095, b"t" * 4096])
    | st.binary(max_size=20) | st.integers() | st.text(max_size=3))
_meta_values = st.dictionaries(
    st.sampled_from(["mode", "uid", "gid", "atime", "mtime", "xattrs", "x", _Str("mode")]),
    st.integers(-(2**64), 2**64) | st.booleans() | st.none() | st.binary(max_size=3)
    | st.dictionaries(st.binary(max_size=4) | st.sampled_from([b"user.a", b"u\0", b"n" * 256,
                                                               "user.a"]),
                      st.binary(max_size=4) | st.sampled_from([b"v" * (64 << 10),
                                                               b"v" * ((64 << 10) + 1), "v"]),
                      max_size=3),
    max_size=7)


@st.composite
def ensure_like(draw: Any) -> dict[Any, Any]:
    """A valid ensure of a random type, then a few random changes to it."""
    t = draw(st.sampled_from("fdlcbps"))
    op: dict[Any, Any] = {"op": "ensure", "pgfid": G1, "name": b"n", "gfid": G2, "type": t}
    if t == "l":
        op["target"] = b"t"
    if t in "cb":
        op["rdev"] = 5
    if draw(st.booleans()):
        op["meta"] = dict(META)
    if t == "f" and draw(st.booleans()):
        op["data"] = b"d"
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["op", "pgfid", "name", "gfid", "type", "meta", "target",
                                    "rdev", "data", "x", b"name"]))
        if draw(st.integers(0, 4)) == 0:
            op.pop(key, None)
        elif key == "meta":
            op["meta"] = draw(_meta_values)
        else:
            op[key] = draw(_field_values)
    return op


@settings(max_examples=2000, deadline=None)
@given(ensure_like())
def test_ensure_fast_path_matches_the_generic_check(op: dict[Any, Any]) -> None:
    from transport.schema import _ensure_ok

    generic = _generic_check_op(op)
    if op.get("op") == "ensure" and _ensure_ok(op):
        assert generic is None, (op, generic)
    # Whatever the path, the answer is the generic one, reason included.
    assert check_op(op) == generic
    try:
        validate_request("ops", {"ops": [VALID_OPS[0], op]})
    except SchemaError as exc:
        assert str(exc) == f"ops: field 'ops': op 1: {generic}"
    else:
        assert generic is None


@pytest.mark.parametrize("op", [o for o in VALID_OPS if o["op"] == "ensure"])
def test_ensure_fast_path_takes_the_valid_ensures(op: dict[str, Any]) -> None:
    from transport.schema import _ensure_ok

    assert _ensure_ok(op)
