"""``georep-node status``: the status files of every brick, checked against reality.

A worker writes ``status.json`` every second (actors/worker.py); the node overwrites it
when a worker dies.  Here they are read and corrected by pid liveness: a brick whose
worker is not running is never shown Active (Faulty while its session is started,
Stopped otherwise).  The JSON schema is documented in docs/status.md.
"""

from __future__ import annotations

import os
import time
from typing import Any

from actors.node import node_pid, pid_alive
from actors.session import Session, SessionError, list_sessions, read_json

SCHEMA_VERSION = 1

BRICK_FIELDS = ("session", "brick", "brick_id", "secondary", "status", "crawl", "last_synced",
                "entry_stime", "stime", "pending", "failures", "checkpoint", "throughput",
                "eta", "faulty_reason", "pid", "resources", "updated")


def _brick_doc(session: Session, brick: Any) -> dict[str, Any]:
    raw = read_json(os.path.join(brick.state, "status.json"))
    doc: dict[str, Any] = {k: None for k in BRICK_FIELDS}
    doc.update(pending={"entry": 0, "meta": 0, "data": 0}, failures=0,
               throughput={"files_per_s": 0.0, "bytes_per_s": 0.0},
               resources={"worker": None, "secondary": None, "node": None})
    if isinstance(raw, dict):
        doc.update({k: raw[k] for k in BRICK_FIELDS if k in raw})
    doc.update(session=session.name, brick=brick.path, brick_id=brick.id,
               secondary=brick.secondary)
    if doc["status"] is None:
        doc["status"] = "Faulty" if session.started else "Stopped"
    alive = pid_alive(doc.get("pid"), f"worker {session.name}")
    if doc["status"] in ("Initializing", "Active", "Paused") and not alive:
        if session.started:
            doc["status"] = "Faulty"
            doc["faulty_reason"] = doc.get("faulty_reason") or "worker is not running"
        else:
            doc["status"] = "Stopped"
    if not alive:
        doc["pid"] = None
        doc["resources"] = {"worker": None, "secondary": None, "node": None}
    return doc


def session_doc(session: Session) -> dict[str, Any]:
    """One session: its config summary, checkpoint and bricks."""
    bricks = [_brick_doc(session, b) for b in session.bricks()]
    t = session.checkpoint()
    cp = None
    if t is not None:
        done = [b.get("checkpoint") or {} for b in bricks]
        completed = bool(done) and all(d.get("time") == t and d.get("completed") for d in done)
        cp = {"time": t, "completed": completed,
              "completion_time": max((d["completion_time"] for d in done), default=None)
              if completed else None}
    state = "Stopped"
    if session.started:
        state = "Paused" if session.paused else "Started"
    return {"name": session.name, "primaries": session.primaries,
            "secondary": session.secondary, "state": state, "paused": session.paused,
            "checkpoint": cp, "bricks": bricks}


def collect(root: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """Session docs (all, or the one named; SessionError if it does not exist)."""
    names = [name] if name else list_sessions(root)
    out = []
    for n in names:
        try:
            out.append(session_doc(Session(n, root).load()))
        except SessionError:
            if name:
                raise
    return out


def status_json(root: str, name: str | None = None) -> dict[str, Any]:
    """The document ``status --json`` prints."""
    pid = node_pid(root)
    node: dict[str, Any] = {"pid": pid, "running": pid is not None}
    return {"version": SCHEMA_VERSION, "time": time.time(), "node": node,
            "sessions": collect(root, name)}


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "N/A"


def status_table(doc: dict[str, Any], detail: bool) -> str:
    """Rows like GlusterFS ``geo-replication status [detail]``."""
    head = ["SESSION", "PRIMARY BRICK", "SECONDARY", "STATUS", "CRAWL STATUS", "LAST_SYNCED"]
    if detail:
        head += ["ENTRY", "DATA", "META", "FAILURES", "CHECKPOINT TIME", "CHECKPOINT COMPLETED",
                 "CHECKPOINT COMPLETION TIME", "FILES/S", "ETA", "PID", "RSS"]
    rows = [head]
    for s in doc["sessions"]:
        for b in s["bricks"]:
            row = [s["name"], b["brick"], b["secondary"], b["status"], b["crawl"] or "N/A",
                   _ts(b["last_synced"])]
            if detail:
                cp = b.get("checkpoint") or {}
                p, w = b["pending"], (b.get("resources") or {}).get("worker") or {}
                row += [str(p.get("entry", 0)), str(p.get("data", 0)), str(p.get("meta", 0)),
                        str(b["failures"]), _ts(cp.get("time")),
                        ("Yes" if cp.get("completed") else "No") if cp else "N/A",
                        _ts(cp.get("completion_time")),
                        f'{(b.get("throughput") or {}).get("files_per_s", 0):g}',
                        f'{b["eta"]:.0f}s' if b.get("eta") is not None else "N/A",
                        str(b["pid"] or "-"), f'{w["rss"] >> 20} MiB' if w.get("rss") else "-"]
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for s in doc["sessions"]:
        for b in s["bricks"]:
            if b["status"] == "Faulty" and b.get("faulty_reason"):
                lines.append(f"{s['name']} {b['brick']}: Faulty: {b['faulty_reason']}")
    if not doc["sessions"]:
        lines = ["No sessions (georep-node create NAME PRIMARY SECONDARY)."]
    return "\n".join(lines)
