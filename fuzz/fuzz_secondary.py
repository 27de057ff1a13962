#!/usr/bin/env python3
"""Long fuzz run of the secondary's request path, in-process (no subprocess per input).

Each input is a byte string (one or more frames) that goes exactly where the host's stdin
goes: FrameReader -> envelope check -> validate_request -> the EntryApplier/Lister
handlers (SecondaryFS.apply_ops, list_dir, lookup, stat_gfid, end_crawl, and the data_*
handlers of fsops.blocks on SecondaryFS.open_data fds). Inputs are well-formed requests
built from a small hostile alphabet, then (half of them) mutated: bit flips, inserted,
deleted or overwritten bytes, truncation, header fields set to extremes, splices.

A crash is any exception other than the expected ProtocolError / SchemaError / OSError /
NotFound / SecondaryError. Every 2,000 inputs (and at the end) the tree outside the
secondary root (canaries, planted symlink and hardlink targets) is checksummed; a change
is reported as an escape. The secondary root is recreated every 2,000 inputs.

    python fuzz/fuzz_secondary.py --inputs 1000000 --workers 2 --seconds 600
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import random
import shutil
import stat
import struct
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsops import blocks
from fsops.constants import LIMBO_GFID, NO_GFID, ROOT_GFID
from fsops.secondary import NotFound, SecondaryError, SecondaryFS
from transport import FrameReader, ProtocolError, SchemaError, encode_frame
from transport import validate_request as validate
from transport.framing import HEADER

R = ROOT_GFID
GFIDS = [R, LIMBO_GFID, NO_GFID] + [bytes([0x10 + i]) * 16 for i in range(8)]
NAMES = [b"a", b"b", b"c", b"\xff\xfe", b"evil", b"evil2", b"hl", b".georep", b"x" * 255,
         b"..", b".", b"a/b", b"\0", b"", b"x" * 256]
TYPES = ["f", "d", "l", "p", "s", "c", "b", "x"]
INTS = [0, 1, -1, 7, 4096, 2**31, 2**32 - 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
EXPECTED = (ProtocolError, SchemaError, OSError, NotFound, SecondaryError)
RESET_EVERY = 2000


def snapshot(top: str, skip: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == top:
            dirnames[:] = [d for d in dirnames if d != skip]
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            h.update(repr((p, st.st_mode, st.st_uid, st.st_gid, st.st_size,
                           st.st_mtime_ns)).encode())
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    h.update(f.read())
            for k in sorted(os.listxattr(p, follow_symlinks=False)):
                h.update(k.encode() + os.getxattr(p, k, follow_symlinks=False))
    return h.hexdigest()


class Target:
    """A secondary root with canaries outside it, and the host's request handlers."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.root = os.path.join(base, "sec")
        out = os.path.join(base, "outside")
        os.makedirs(os.path.join(out, "sub"))
        for p in ("canary", "sub/f"):
            with open(os.path.join(out, p), "wb") as f:
                f.write(b"canary")
        self.before = snapshot(base, "sec")
        self.fs: SecondaryFS | None = None
        self.reset()

    def reset(self) -> None:
        if self.fs is not None:
            self.fs.close()
            shutil.rmtree(self.root)
        os.mkdir(self.root)
        out = os.path.join(self.base, "outside")
        os.symlink(out, os.path.join(self.root, "evil"))
        os.symlink("../outside/canary", os.path.join(self.root, "evil2"))
        os.link(os.path.join(out, "canary"), os.path.join(self.root, "hl"))
        self.fs = SecondaryFS(os.fsencode(self.root))

    def escaped(self) -> bool:
        return snapshot(self.base, "sec") != self.before

    def handle(self, method: str, a: dict[str, Any], payload: bytes | None) -> Any:
        fs = self.fs
        assert fs is not None
        if method == "ops":
            res = fs.apply_ops(a["ops"])
            assert len(res) == len(a["ops"]), "one result per op"
            return res
        if method == "list_dir":
            return fs.list_dir(a["gfid"])
        if method == "lookup":
            return fs.lookup(a["gfids"])
        if method == "stat_gfid":
            return fs.stat_gfid(a["gfid"])
        if method == "end_crawl":
            return fs.end_crawl()
        if method in ("ping", "hello", "commit"):
            return None
        fd = fs.open_data(a["gfid"])
        try:
            if method == "data_sigs":
                return blocks.handle_sigs(fd, a["offset"], a["length"], a["block"])
            if method == "data_write":
                return blocks.handle_write(fd, a["offset"], payload or b"")
            if method == "data_hole":
                return blocks.handle_hole(fd, a["offset"], a["length"])
            if method == "data_finish":
                blocks.handle_truncate(fd, a["size"])
                return fs.apply_meta_fd(fd, a["meta"])
            raise AssertionError(f"validated an unknown method {method}")
        finally:
            os.close(fd)


# -- input generation ----------------------------------------------------------------------

def pick_int(r: random.Random) -> int:
    return r.choice(INTS) if r.random() < 0.5 else r.randrange(0, 1 << 20)


def gen_meta(r: random.Random) -> dict:
    m: dict[str, Any] = {}
    for k in ("mode", "uid", "gid", "atime", "mtime"):
        if r.random() < 0.4:
            m[k] = r.choice([0o644, 0o7777, 0, 1234]) if r.random() < 0.7 else pick_int(r)
    if r.random() < 0.2:
        m["xattrs"] = {r.choice([b"user.a", b"user.\xff", b"trusted.t", b"security.x",
                                 b"system.posix_acl_access"]): r.randbytes(r.randrange(8))}
    return m


def gen_op(r: random.Random) -> dict:
    kind = r.choice(["ensure", "ensure", "delete", "rename", "meta"])
    g = r.choice(GFIDS)
    if kind == "ensure":
        t = r.choice(TYPES)
        op: dict[str, Any] = {"op": kind, "pgfid": r.choice(GFIDS[:5]),
                              "name": r.choice(NAMES), "gfid": g, "type": t}
        if t == "l":
            op["target"] = r.choice([b"../outside", b"/etc/passwd", b"t"])
        if t in ("c", "b"):
            op["rdev"] = r.choice([0, 259, pick_int(r)])
        if t == "f" and r.random() < 0.5:
            op["data"] = r.randbytes(r.randrange(16))
        if r.random() < 0.5:
            op["meta"] = gen_meta(r)
        return op
    if kind == "delete":
        return {"op": kind, "pgfid": r.choice(GFIDS[:5]), "name": r.choice(NAMES), "gfid": g}
    if kind == "rename":
        return {"op": kind, "gfid": g, "pgfid": r.choice(GFIDS[:5]), "name": r.choice(NAMES),
                "npgfid": r.choice(GFIDS[:5]), "nname": r.choice(NAMES),
                "type": r.choice(TYPES)}
    return {"op": "meta", "gfid": g, "meta": gen_meta(r)}


def gen_request(r: random.Random, rid: int) -> tuple[dict, bytes | None]:
    m = r.choice(["ops"] * 6 + ["data_write"] * 2 + ["data_sigs", "data_hole", "data_finish",
                                                     "list_dir", "lookup", "stat_gfid",
                                                     "ping", "end_crawl", "commit"])
    g = r.choice(GFIDS)
    payload = None
    if m == "ops":
        a: dict[str, Any] = {"ops": [gen_op(r) for _ in range(r.randrange(1, 6))]}
    elif m == "data_write":
        a = {"gfid": g, "offset": r.choice([0, 1, 4096, pick_int(r)])}
        payload = r.randbytes(r.randrange(64))
    elif m == "data_sigs":
        a = {"gfid": g, "offset": r.choice([0, pick_int(r)]), "length": pick_int(r),
             "block": r.choice([1, 4, 4096, 8 << 20, pick_int(r)])}
    elif m == "data_hole":
        a = {"gfid": g, "offset": pick_int(r), "length": pick_int(r)}
    elif m == "data_finish":
        a = {"gfid": g, "size": r.choice([0, 5, pick_int(r)]), "meta": gen_meta(r)}
    elif m == "lookup":
        a = {"gfids": [r.choice(GFIDS) for _ in range(r.randrange(4))]}
    elif m in ("list_dir", "stat_gfid"):
        a = {"gfid": g}
    else:
        a = {}
    # Wrong types in a well-formed frame, now and then.
    if r.random() < 0.05 and a:
        a[r.choice(list(a))] = r.choice([None, "s", 1.5, -1, [1], {}, b"\0" * 16])
    return {"t": "q", "id": rid, "m": m, "a": a}, payload


def mutate(r: random.Random, raw: bytearray) -> bytearray:
    for _ in range(r.randrange(1, 4)):
        c = r.randrange(7)
        if c == 0 and raw:
            i = r.randrange(len(raw))
            raw[i] ^= 1 << r.randrange(8)
        elif c == 1:
            raw[r.randrange(len(raw) + 1):0] = r.randbytes(r.randrange(1, 8))
        elif c == 2 and raw:
            i = r.randrange(len(raw))
            del raw[i:i + r.randrange(1, 8)]
        elif c == 3 and raw:
            del raw[r.randrange(len(raw)):]
        elif c == 4 and len(raw) >= HEADER.size:
            field = r.choice([(4, "I"), (8, "I"), (2, "H")])
            val = r.choice([0, 1, 2**32 - 1, 16 << 20, (16 << 20) + 1, 8 << 20, len(raw)])
            struct.pack_into(">" + field[1], raw, field[0], val % (1 << (8 * struct.calcsize(
                field[1]))))
        elif c == 5 and raw:
            i = r.randrange(len(raw))
            raw[i] = r.choice([0x00, 0xff, 0xc0, 0xc1, 0xdc, 0xdd, 0xde, 0xdf, 0x91, 0x81,
                               0xcf, 0xd3, 0xc4, 0xd9, 0x7f, 0x80])
        else:
            raw += r.randbytes(r.randrange(1, 32))
    return raw


def gen_input(r: random.Random) -> bytes:
    frames = []
    for i in range(r.randrange(1, 4)):
        body, payload = gen_request(r, i + 1)
        try:
            frames.append(b"".join(bytes(p) for p in encode_frame(body, payload)))
        except Exception:
            continue
    raw = bytearray(b"".join(frames))
    if r.random() < 0.5:
        raw = mutate(r, raw)
    if r.random() < 0.01:
        raw = bytearray(r.randbytes(r.randrange(64)))
    return bytes(raw)


# -- running -------------------------------------------------------------------------------

STATS = dict.fromkeys(["frames", "fatal", "schema", "handled", "failed", "ops", "raw_ops"], 0)


def run_input(t: Target, raw: bytes, unchecked: bool) -> None:
    """``unchecked``: an ops batch the schema refuses still goes to apply_ops, as an
    in-process caller's would (apply_ops must defend itself too)."""
    reader = FrameReader(io.BytesIO(raw))
    while True:
        try:
            frame = reader.read()
        except ProtocolError:
            STATS["fatal"] += 1
            return  # fatal for the connection: the host exits with one line
        if frame is None:
            return
        STATS["frames"] += 1
        body, payload = frame
        rid, method, args = body.get("id"), body.get("m"), body.get("a")
        if body.get("t") != "q" or type(rid) is not int or not 0 <= rid < 2**63 \
                or type(method) is not str or set(body) != {"t", "id", "m", "a"}:
            STATS["fatal"] += 1
            return  # malformed envelope: fatal
        try:
            validate(method, args, payload)
        except SchemaError:
            STATS["schema"] += 1
            if unchecked and method == "ops" and isinstance(args, dict) \
                    and isinstance(args.get("ops"), list):
                STATS["raw_ops"] += len(args["ops"])
                t.handle("ops", args, None)
            continue
        try:
            STATS["handled"] += 1
            if method == "ops":
                STATS["ops"] += len(args["ops"])
            t.handle(method, args, payload)
        except EXPECTED:
            STATS["failed"] += 1  # an error reply


def worker(seed: int, inputs: int, seconds: float, out: Any) -> None:
    r = random.Random(seed)
    base = tempfile.mkdtemp(prefix=f"georep-fuzz-{seed}-")
    t = Target(base)
    crashes: dict[str, tuple[int, str, bytes]] = {}
    escapes = 0
    start = time.monotonic()
    n = 0
    while n < inputs and time.monotonic() - start < seconds:
        raw = gen_input(r)
        n += 1
        try:
            run_input(t, raw, r.random() < 0.3)
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)[-1]
            key = f"{type(e).__name__} at {os.path.basename(tb.filename)}:{tb.lineno}"
            crashes.setdefault(key, (n, f"{type(e).__name__}: {e}"[:300], raw[:2000]))
        if n % RESET_EVERY == 0:
            if t.escaped():
                escapes += 1
                crashes.setdefault("ESCAPE", (n, "outside the root changed", raw[:2000]))
                break
            t.reset()
    if t.escaped():
        escapes += 1
    assert t.fs is not None
    t.fs.close()
    shutil.rmtree(base)
    out.put((seed, n, time.monotonic() - start, crashes, escapes, dict(STATS)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="total inputs")
    ap.add_argument("--seconds", type=float, default=600.0, help="wall-clock bound")
    ap.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    q: Any = multiprocessing.Queue()
    per = -(-a.inputs // a.workers)
    procs = [multiprocessing.Process(target=worker, args=(a.seed + i, per, a.seconds, q))
             for i in range(a.workers)]
    start = time.monotonic()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    total = sum(res[1] for res in results)
    crashes: dict[str, tuple] = {}
    stats = dict.fromkeys(STATS, 0)
    for res in results:
        for k, v in res[3].items():
            crashes.setdefault(k, v)
        for k, v in res[5].items():
            stats[k] += v
    escapes = sum(res[4] for res in results)
    took = time.monotonic() - start
    print(f"seed {a.seed}, {a.workers} workers: {total} inputs in {took:.0f} s "
          f"({total / took:.0f}/s); {len(crashes)} distinct crashes; {escapes} escapes")
    print("frames decoded {frames}, fatal framing/envelope {fatal}, schema-refused {schema}, "
          "requests handled {handled} (error replies {failed}), ops applied {ops}, "
          "unchecked ops applied {raw_ops}".format(**stats))
    for k, (n, msg, raw) in sorted(crashes.items()):
        print(f"CRASH {k}: {msg}\n  input #{n}: {raw[:300]!r}")
    return 1 if crashes or escapes else 0


if __name__ == "__main__":
    sys.exit(main())
