"""Actor introspection: what each actor is doing, read without asking it.

:class:`Inspectable` is a mixin for ``pykka.ThreadingActor`` subclasses (put it first
among the bases).  It wraps pykka's ``_handle_receive`` (pykka 4.5: the one place every
message, proxy call or not, goes through) and records, per actor: messages handled
(per method too), the message in hand and since when, the last error, and a ring of
the last :data:`RECENT` messages with their durations.  The cost is two clock reads,
a deque append and a dict increment per message: 0.7-1 us measured (pykka's own
handling of a proxy call is ~0.4 us, a pipelined ask round trip 11-15 us), nothing
measurable on the pipeline's messages, which each carry a directory or a batch.

:func:`snapshot_actors` reads those fields from another thread.  It never asks an
actor: an actor busy with a long message (the Supervisor runs a whole live session in
one) would block the snapshot for as long.  Reading is safe enough under the GIL:
each field is replaced by one assignment of an immutable value (ints, tuples; times
are ``time.monotonic``), the deque is only appended to by the actor and the counts
dict only updated by it, and both are copied in one C call (``list()``, ``dict()``,
which hold the GIL throughout; retried should one ever see a concurrent change).
A snapshot may therefore be a few microseconds stale or mix two consecutive messages'
fields; it is never corrupt.

Actor modules may override :meth:`Inspectable.inspect_extra` to add their own
counters; it runs in the inspecting thread, so it must only read fields.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import pykka
from pykka import messages

#: Messages kept per actor for ``actor NAME``.
RECENT = 20


_clock = time.monotonic


def _message_name(message: Any) -> str:
    if type(message) is messages.ProxyCall:
        path = message.attr_path
        return path[0] if len(path) == 1 else ".".join(path)
    if isinstance(message, messages.ProxyGetAttr):
        return "get " + ".".join(message.attr_path)
    if isinstance(message, messages.ProxySetAttr):
        return "set " + ".".join(message.attr_path)
    if type(message).__name__ == "_ActorStop":
        return "stop"
    return type(message).__name__


class Inspectable:
    """Mixin recording what a pykka actor handles; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ins_started = _clock()
        self._ins_handled = 0
        #: (message name, monotonic start) of the message being handled, or None.
        self._ins_current: tuple[str, float] | None = None
        #: (exception type, message, monotonic time) of the last failed message.
        self._ins_error: tuple[str, str, float] | None = None
        #: (message name, monotonic start, seconds taken, failed) per recent message.
        self._ins_recent: deque[tuple[str, float, float, bool]] = deque(maxlen=RECENT)
        self._ins_counts: dict[str, int] = {}

    def _handle_receive(self, message: Any) -> Any:
        # Kept flat (no helper calls): this runs for every message of every actor.
        name = self.inspect_name(message)
        start = _clock()
        self._ins_current = (name, start)
        failed = True
        try:
            result = super()._handle_receive(message)  # type: ignore[misc]
            failed = False
            return result
        except BaseException as exc:
            self._ins_error = (type(exc).__name__, str(exc)[:500], _clock())
            raise
        finally:
            self._ins_recent.append((name, start, _clock() - start, failed))
            counts = self._ins_counts
            counts[name] = counts.get(name, 0) + 1
            self._ins_handled += 1
            self._ins_current = None

    def inspect_name(self, message: Any) -> str:
        """How a message is named in counts and recent messages (the proxy method)."""
        return _message_name(message)

    def inspect_extra(self) -> dict[str, Any]:
        """Actor-specific counters for the shell (runs in the inspecting thread: read only)."""
        return {}


def _copy(make: Any, source: Any) -> Any:
    for _ in range(5):
        try:
            return make(source)
        except RuntimeError:  # "changed size during iteration": the actor moved on
            continue
    return make()


def describe(actor: Any, *, detail: bool = False, now: float | None = None) -> dict[str, Any]:
    """One actor's row (``detail``: with per-method counts, recent messages and extras)."""
    now = _clock() if now is None else now
    stopped = actor.actor_stopped.is_set()
    row: dict[str, Any] = {"class": type(actor).__name__, "urn": actor.actor_urn,
                           "mailbox": actor.actor_inbox.qsize()}
    if not isinstance(actor, Inspectable):
        row.update(state="stopped" if stopped else "alive", handled=None, in_hand=None,
                   in_hand_age=None, age=None, last_error=None)
        return row
    current = actor._ins_current
    error = actor._ins_error
    row.update(
        state="stopped" if stopped else ("busy" if current else "idle"),
        handled=actor._ins_handled,
        in_hand=current[0] if current else None,
        in_hand_age=round(now - current[1], 3) if current else None,
        age=round(now - actor._ins_started, 3),
        last_error=None if error is None else {
            "type": error[0], "message": error[1], "age": round(now - error[2], 3)},
    )
    if detail:
        row["counts"] = _copy(dict, actor._ins_counts)
        row["recent"] = [{"method": n, "ago": round(now - s, 3), "seconds": round(d, 6),
                          "failed": f} for n, s, d, f in _copy(list, actor._ins_recent)]
        try:
            row["extra"] = actor.inspect_extra()
        except Exception as exc:  # an extra that raced the actor must not break the view
            row["extra"] = {"error": f"{type(exc).__name__}: {exc}"}
    return row


def live_actors() -> list[Any]:
    """The actor objects registered with pykka, in start order (no message sent)."""
    out = []
    for ref in pykka.ActorRegistry.get_all():
        actor = ref._actor_weakref()
        if actor is not None:
            out.append(actor)
    return out


def snapshot_actors(*, detail: bool = False) -> list[dict[str, Any]]:
    """A row per running actor, named by class (``Syncer#2`` when a class has several).

    Reads the fields :class:`Inspectable` keeps; never asks an actor.
    """
    now = _clock()
    actors = live_actors()
    per_class: dict[str, int] = {}
    for a in actors:
        per_class[type(a).__name__] = per_class.get(type(a).__name__, 0) + 1
    seen: dict[str, int] = {}
    rows = []
    for a in actors:
        cls = type(a).__name__
        seen[cls] = seen.get(cls, 0) + 1
        row = describe(a, detail=detail, now=now)
        row["name"] = cls if per_class[cls] == 1 else f"{cls}#{seen[cls]}"
        rows.append(row)
    return rows


def find_actors(name: str) -> list[Any]:
    """Actor objects whose snapshot name or class name is ``name`` (case-insensitive)."""
    want = name.lower()
    rows = snapshot_actors()
    objs = live_actors()
    by_urn = {a.actor_urn: a for a in objs}
    return [by_urn[r["urn"]] for r in rows
            if r["urn"] in by_urn and want in (r["name"].lower(), r["class"].lower())]
