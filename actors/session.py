"""Named sessions in the state root: config, bricks, checkpoint, status files.

Layout (the state root is ``$GEOREP_STATE_DIR``, else /var/lib/georep as root, else
~/.local/state/georep; mode 0700)::

    node.pid  node.sock  node.log            the node supervisor (actors/node.py)
    sessions/NAME/config.ini                  [session] primaries, secondary; [config] keys
    sessions/NAME/georep.log                  one line per event, all bricks of the session
    sessions/NAME/started                     present while the session should run
    sessions/NAME/paused                      present while it is paused
    sessions/NAME/checkpoint.json             {"time": epoch seconds, "set_at": ...}
    sessions/NAME/bricks/BRICK-ID/            one worker per brick: journal/, dirmap.db,
        status.json, failures.json, worker.err, worker.pid, recorder.*

Every config key, its default and its validation is in :data:`KEYS` (docs/config.md).
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsops.dirmap import default_state_root

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SessionError(Exception):
    """A one-line reason for people (bad name, missing session, bad config value...)."""


# -- config keys -------------------------------------------------------------------------

def _bool(v: str) -> str:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return "true"
    if low in ("0", "false", "no", "off"):
        return "false"
    raise ValueError("expected true or false")


def _int(lo: int, hi: int | None = None) -> Callable[[str], str]:
    def check(v: str) -> str:
        n = int(v)
        if n < lo or (hi is not None and n > hi):
            raise ValueError(f"expected an integer in [{lo}, {hi if hi is not None else 'inf'}]")
        return str(n)
    return check


def _float(lo: float) -> Callable[[str], str]:
    def check(v: str) -> str:
        x = float(v)
        if not x >= lo:
            raise ValueError(f"expected a number >= {lo:g}")
        return f"{x:g}"
    return check


def _choice(*values: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        w = v.strip().upper() if values[0].isupper() else v.strip()
        if w not in values:
            raise ValueError(f"expected one of {', '.join(values)}")
        return w
    return check


def _rate(v: str) -> str:
    from actors.engines import parse_rate

    if v.strip() in ("0", ""):
        return "0"
    parse_rate(v.strip())
    return v.strip()


def _text(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    if "\n" in v or "\0" in v:
        raise ValueError("must be one line")
    return v.strip()


def _patterns(v: str) -> str:
    if "\n" in v or "\0" in v:
        raise ValueError("must be one line (comma-separated patterns)")
    return ",".join(p.strip() for p in v.split(",") if p.strip())


@dataclass(frozen=True)
class Key:
    """One config key."""

    name: str
    default: str
    check: Callable[[str], str]
    help: str
    used: bool = True  # False: accepted and validated, not yet honoured (docs say so)


KEYS: dict[str, Key] = {k.name: k for k in (
    Key("sync-engine", "native", _choice("native", "rsync", "tarssh"),
        "how file data travels: native (block delta), rsync or tarssh"),
    Key("sync-jobs", "2", _int(1, 64), "parallel data transfers (Syncers) per worker"),
    Key("batch-max-ops", "1024", _int(1, 100000), "entry/meta ops per batch sent to the secondary"),
    Key("timeout", "600", _float(1), "longest wait in seconds for one reply from the secondary"),
    Key("ssh-command", "ssh", _text, "ssh client and its options for a remote secondary"),
    Key("remote-command", "georep-node", _text, "how to run georep-node on the secondary host"),
    Key("log-level", "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"),
        "level of the session log (georep.log)"),
    Key("recorder-linger", "600", _float(0),
        "the recorder daemon exits after this long without its worker (0: never)"),
    Key("metrics-port", "0", _int(0, 65535),
        "serve Prometheus text metrics on 127.0.0.1:PORT from the node (0: off)"),
    Key("secondary-timeout", "120", _float(1),
        "the secondary host exits after this long without a request"),
    Key("ignore-deletes", "false", _bool, "do not propagate deletes"),
    Key("sync-xattrs", "true", _bool, "replicate extended attributes"),
    Key("sync-acls", "true", _bool, "replicate POSIX ACLs"),
    Key("exclude", "", _patterns, "comma-separated glob patterns not to replicate"),
    Key("bandwidth-limit", "0", _rate, "bytes/s for file data, suffixes K, M, G "
        "(0: unlimited)"),
    Key("compress", "false", _bool, "ssh compression (-C)"),
)}


def validate(key: str, value: str) -> str:
    """The normalized value, or SessionError with a one-line reason."""
    k = KEYS.get(key)
    if k is None:
        raise SessionError(f"unknown config key {key!r} (known: {', '.join(sorted(KEYS))})")
    try:
        return k.check(value)
    except ValueError as e:
        raise SessionError(f"invalid value {value!r} for {key}: {e}") from None


# -- paths --------------------------------------------------------------------------------

def state_root() -> str:
    """The state root, created with mode 0700."""
    root = default_state_root()
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def session_dir(name: str, root: str | None = None) -> str:
    return os.path.join(root or state_root(), "sessions", name)


def brick_id(path: str) -> str:
    """A stable, readable id for a brick path: ``<basename>-<8 hex of its path>``."""
    ap = os.path.abspath(path)
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(ap.rstrip("/")) or "root")[:40]
    return f"{base}-{hashlib.sha1(ap.encode(), usedforsecurity=False).hexdigest()[:8]}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise SessionError(f"invalid session name {name!r}: letters, digits, '_', '.', '-' "
                           "(up to 64, not starting with '.' or '-')")
    return name


def write_atomic(path: str, data: bytes | str, mode: int = 0o600) -> None:
    """Write a file by rename, so readers see the old or the new content, never a part."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, raw)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    """Parsed JSON, or None if missing or unreadable (a writer mid-rename never shows)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# -- sessions -----------------------------------------------------------------------------

@dataclass
class Brick:
    path: str
    id: str
    secondary: str
    state: str


class Session:
    """A session on disk."""

    def __init__(self, name: str, root: str | None = None) -> None:
        self.name = check_name(name)
        self.root = root or state_root()
        self.dir = session_dir(name, self.root)
        self.config_path = os.path.join(self.dir, "config.ini")
        self._cp: configparser.ConfigParser | None = None

    # existence / creation
    def exists(self) -> bool:
        return os.path.isfile(self.config_path)

    def load(self) -> Session:
        if not self.exists():
            raise SessionError(f"no session named {self.name!r} (georep-node create ...)")
        cp = configparser.ConfigParser(interpolation=None)
        cp.read(self.config_path, encoding="utf-8")
        if not cp.has_section("session") or not cp.has_option("session", "primaries"):
            raise SessionError(f"{self.config_path}: damaged (no [session] primaries)")
        if not cp.has_section("config"):
            cp.add_section("config")
        self._cp = cp
        return self

    @property
    def cp(self) -> configparser.ConfigParser:
        if self._cp is None:
            self.load()
        assert self._cp is not None
        return self._cp

    @classmethod
    def create(cls, name: str, primaries: list[str], secondary: str,
               config: dict[str, str]) -> Session:
        s = cls(name)
        if s.exists():
            raise SessionError(f"session {name!r} already exists")
        paths = []
        for p in primaries:
            ap = os.path.abspath(p)
            if not os.path.isdir(ap):
                raise SessionError(f"primary {p!r} is not a directory")
            paths.append(ap)
        if len(set(paths)) != len(paths):
            raise SessionError("the same primary is given twice")
        if len(paths) > 1:
            bases = [os.path.basename(p) for p in paths]
            if len(set(bases)) != len(bases):
                raise SessionError("with several primaries, their last path components must "
                                   "differ (each goes to SECONDARY/<name>)")
        checked = {k: validate(k, v) for k, v in config.items()}
        cp = configparser.ConfigParser(interpolation=None)
        cp["session"] = {"primaries": "\n".join(paths), "secondary": secondary,
                         "created": str(int(time.time()))}
        cp["config"] = checked
        os.makedirs(os.path.join(s.root, "sessions"), mode=0o700, exist_ok=True)
        os.makedirs(s.dir, mode=0o700)
        s._cp = cp
        s.save()
        return s

    def save(self) -> None:
        import io

        buf = io.StringIO()
        self.cp.write(buf)
        write_atomic(self.config_path, buf.getvalue())

    # content
    @property
    def primaries(self) -> list[str]:
        return [p for p in self.cp.get("session", "primaries").splitlines() if p.strip()]

    @property
    def secondary(self) -> str:
        return self.cp.get("session", "secondary")

    def get(self, key: str) -> str:
        if key not in KEYS:
            raise SessionError(f"unknown config key {key!r}")
        return self.cp.get("config", key, fallback=KEYS[key].default)

    def is_set(self, key: str) -> bool:
        return self.cp.has_option("config", key)

    def set(self, key: str, value: str) -> str:
        v = validate(key, value)
        self.cp.set("config", key, v)
        self.save()
        return v

    def reset(self, key: str) -> None:
        if key not in KEYS:
            raise SessionError(f"unknown config key {key!r}")
        self.cp.remove_option("config", key)
        self.save()

    def bricks(self) -> list[Brick]:
        prims = self.primaries
        out = []
        for p in prims:
            bid = brick_id(p)
            sec = self.secondary
            if len(prims) > 1:
                sec = sec.rstrip("/") + "/" + os.path.basename(p)
            out.append(Brick(p, bid, sec, os.path.join(self.dir, "bricks", bid)))
        return out

    def brick(self, path: str) -> Brick:
        ap = os.path.abspath(path)
        for b in self.bricks():
            if b.path == ap:
                return b
        raise SessionError(f"{path!r} is not a primary brick of session {self.name!r}")

    # flags
    def _flag(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def started(self) -> bool:
        return os.path.exists(self._flag("started"))

    def set_started(self, on: bool) -> None:
        self._set_flag("started", on)

    @property
    def paused(self) -> bool:
        return os.path.exists(self._flag("paused"))

    def set_paused(self, on: bool) -> None:
        self._set_flag("paused", on)

    def _set_flag(self, name: str, on: bool) -> None:
        if on:
            write_atomic(self._flag(name), f"{int(time.time())}\n")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._flag(name))

    # checkpoint
    def checkpoint(self) -> float | None:
        d = read_json(self._flag("checkpoint.json"))
        return float(d["time"]) if isinstance(d, dict) and "time" in d else None

    def set_checkpoint(self, t: float) -> None:
        write_atomic(self._flag("checkpoint.json"),
                     json.dumps({"time": t, "set_at": time.time()}))


def list_sessions(root: str | None = None) -> list[str]:
    d = os.path.join(root or state_root(), "sessions")
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    return [n for n in names if NAME_RE.match(n) and os.path.isfile(
        os.path.join(d, n, "config.ini"))]


def parse_checkpoint(spec: str, now: float | None = None) -> float:
    """``now``, ``YYYY-mm-dd HH:MM:SS`` (local time) or an epoch -> epoch seconds."""
    if spec == "now":
        return time.time() if now is None else now
    try:
        return float(spec)
    except ValueError:
        pass
    try:
        return time.mktime(time.strptime(spec, "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        raise SessionError(f"invalid checkpoint {spec!r}: now, \"YYYY-mm-dd HH:MM:SS\" or "
                           "epoch seconds") from None
