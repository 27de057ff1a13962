"""Fault points for crash-recovery tests: ``GEOREP_FAULTS`` (see docs/faults.md).

``GEOREP_FAULTS="after_entry_ops,before_mark:0.3,mid_data:raise"`` arms named points;
code calls :func:`fault` at each of them.  An armed point fires with probability ``p``
(default 1.0) and then either ends the process at once with status 137, the way
SIGKILL would (``os._exit``: no cleanup, no flush, no marks), raises
:class:`FaultInjected` (``:raise``) or blocks the calling thread for S seconds
(``:hang=S``: a stuck actor, for the watchdog).  ``:once=PATH`` fires the point only
where PATH can still be created (O_EXCL): once across every process and restart, so a
restarted worker does not meet the same fault again.  Unset, a point costs one dict
lookup.

``read_eio:SUBSTRING`` is a test-only fault of another kind: reading a primary file
whose relative path contains SUBSTRING fails with EIO (:func:`check_read`).

The variable is parsed once per process, on first use.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("georep.faults")

ENV = "GEOREP_FAULTS"

#: The points compiled into the code (documented in docs/faults.md).
POINTS = frozenset({
    "after_entry_ops",   # Batcher: a batch's entry ops were acknowledged by the secondary
    "before_mark",       # Follower / Supervisor: just before writing entry_stime/stime
    "mid_data",          # transfer: after the first data_write of a file was sent
    "secondary_after_apply",  # secondary host: a request applied, its reply not yet sent
})


class FaultInjected(RuntimeError):
    """Raised by a fault point armed with ``:raise``."""


@dataclass(frozen=True, slots=True)
class _Spec:
    p: float = 1.0
    action: str = "kill"  # or "raise", "hang"
    hang: float = 0.0  # seconds, for "hang"
    once: str | None = None  # a marker path: fire only if it can be created


_specs: dict[str, _Spec] | None = None
_eio: list[bytes] = []


def parse(text: str) -> tuple[dict[str, _Spec], list[bytes]]:
    """``name[:p][:raise|:kill|:hang=S][:once=PATH]`` items separated by commas, plus
    ``read_eio:SUBSTRING``."""
    specs: dict[str, _Spec] = {}
    eio: list[bytes] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, rest = item.partition(":")
        if name == "read_eio":
            if not rest:
                raise ValueError("read_eio needs a path substring: read_eio:SUBSTRING")
            eio.append(os.fsencode(rest))
            continue
        if name not in POINTS:
            raise ValueError(f"unknown fault point {name!r} (known: {', '.join(sorted(POINTS))})")
        p, action, hang, once = 1.0, "kill", 0.0, None
        for word in filter(None, rest.split(":")):
            key, eq, value = word.partition("=")
            if word in ("raise", "kill"):
                action = word
            elif key == "hang" and eq:
                action, hang = "hang", float(value)
                if hang <= 0:
                    raise ValueError(f"fault {name}: hang needs seconds > 0")
            elif key == "once" and eq:
                if not value:
                    raise ValueError(f"fault {name}: once needs a marker path")
                once = value
            else:
                p = float(word)
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"fault {name}: probability {p} is not in 0..1")
        specs[name] = _Spec(p, action, hang, once)
    return specs, eio


def _load() -> dict[str, _Spec]:
    global _specs, _eio
    if _specs is None:
        try:
            _specs, _eio = parse(os.environ.get(ENV, ""))
        except ValueError as e:
            print(f"georep: {ENV}: {e}", file=sys.stderr)
            _specs, _eio = {}, []
        if _specs or _eio:
            log.warning("fault points armed: %s", os.environ.get(ENV))
    return _specs


def reset(text: str | None = None) -> None:
    """Re-parse (tests); ``text`` replaces the environment's value."""
    global _specs, _eio
    _specs = None
    if text is not None:
        _specs, _eio = parse(text)


def fault(name: str) -> None:
    """A fault point: does nothing unless ``name`` is armed in ``GEOREP_FAULTS``."""
    spec = _load().get(name)
    if spec is None or (spec.p < 1.0 and random.random() >= spec.p):
        return
    if spec.once is not None:
        try:
            os.close(os.open(spec.once, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600))
        except FileExistsError:
            return  # fired already, in this process or another one
    if spec.action == "raise":
        raise FaultInjected(f"fault point {name}")
    if spec.action == "hang":
        log.warning("fault point %s: hanging for %g s (pid %d)", name, spec.hang, os.getpid())
        time.sleep(spec.hang)  # the stuck actor the test wants, not synchronization
        return
    try:
        print(f"georep: fault point {name}: killed (pid {os.getpid()})", file=sys.stderr,
              flush=True)
    finally:
        os._exit(137)


def check_read(relpath: bytes) -> None:
    """Test-only ``read_eio`` fault: EIO when reading a primary file whose path matches."""
    _load()
    for sub in _eio:
        if sub in relpath:
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected by {ENV})")
