"""Operator commands of ``georep-node``: named sessions run by the node supervisor.

create, start, stop, pause, resume, delete, status, config, checkpoint, failures, node
(and the hidden ``worker``).  Registered into the parser by ``actors.cli.build_parser``
through :func:`add_operator_commands`.  See README.md, docs/config.md, docs/status.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from actors.node import NodeError, ensure_node, node_pid, request, stop_recorders, stray_workers
from actors.session import KEYS, Session, SessionError, parse_checkpoint, state_root
from actors.status import collect, status_json, status_table

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
RUNNING = ("Initializing", "Active", "Paused")


def _fail(cmd: str, msg: str, code: int = EXIT_ERROR) -> int:
    print(f"georep-node {cmd}: {msg}", file=sys.stderr)
    return code


Command = Callable[[argparse.Namespace], int]


def _command(cmd: str) -> Callable[[Command], Command]:
    """Decorator: a SessionError anywhere in the command (no such session, damaged config,
    bad value...) ends it with ``georep-node CMD: reason`` on stderr and exit status 2."""
    def wrap(fn: Command) -> Command:
        @functools.wraps(fn)
        def run(a: argparse.Namespace) -> int:
            try:
                return fn(a)
            except SessionError as e:
                return _fail(cmd, str(e))
        return run
    return wrap


def _wait(cond: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


def _bricks(name: str) -> list[dict[str, Any]]:
    return [b for s in collect(None, name) for b in s["bricks"]]


# -- commands -----------------------------------------------------------------------------

@_command("create")
def cmd_create(a: argparse.Namespace) -> int:
    if len(a.paths) < 2:
        return _fail("create", "give at least one PRIMARY and the SECONDARY")
    config: dict[str, str] = {}
    for item in a.config or []:
        key, sep, value = item.partition("=")
        if not sep:
            return _fail("create", f"--config {item!r}: expected KEY=VALUE")
        config[key.strip()] = value
    s = Session.create(a.name, a.paths[:-1], a.paths[-1], config)
    print(f"session {s.name} created: {', '.join(s.primaries)} -> {s.secondary} "
          f"(georep-node start {s.name})")
    return EXIT_OK


@_command("start")
def cmd_start(a: argparse.Namespace) -> int:
    s = Session(a.name).load()
    t0 = time.time()
    s.set_started(True)
    try:
        ensure_node(s.root)
        request(s.root, {"op": "start", "session": s.name})
    except NodeError as e:
        return _fail("start", str(e))

    def up() -> bool:
        bricks = _bricks(s.name)
        return all(b["status"] in RUNNING and (b["updated"] or 0) >= t0 - 2 for b in bricks) \
            or any(b["status"] == "Faulty" and (b["updated"] or 0) >= t0 for b in bricks)

    _wait(up, a.timeout)
    bad = [b for b in _bricks(s.name) if b["status"] not in RUNNING]
    if bad:
        for b in bad:
            print(f"georep-node start: {s.name} {b['brick']}: {b['status']}"
                  f"{': ' + b['faulty_reason'] if b.get('faulty_reason') else ''}",
                  file=sys.stderr)
        return _fail("start", f"session {s.name} started, but {len(bad)} brick(s) are not "
                     "up (the node keeps retrying; see georep-node status)", EXIT_FAILED)
    print(f"session {s.name} started")
    return EXIT_OK


@_command("stop")
def cmd_stop(a: argparse.Namespace) -> int:
    s = Session(a.name).load()
    was = s.started
    s.set_started(False)
    if node_pid(s.root) is not None:
        try:
            request(s.root, {"op": "stop", "session": s.name,
                             "recorders": a.with_recorders}, timeout=120)
        except NodeError as e:
            return _fail("stop", str(e))
    else:
        from actors.node import _terminate, mark_status

        _terminate(stray_workers(s), 30)
        if a.with_recorders:
            stop_recorders(s)
        for b in s.bricks():
            if os.path.isdir(b.state):
                mark_status(b, "Stopped", None, pid=None)
    print(f"session {s.name} {'stopped' if was else 'was not running'}")
    return EXIT_OK


def _pause(a: argparse.Namespace, on: bool) -> int:
    cmd = "pause" if on else "resume"
    s = Session(a.name).load()
    if not s.started:
        return _fail(cmd, f"session {s.name} is not started")
    s.set_paused(on)

    def done() -> bool:
        bricks = _bricks(s.name)
        return all((b["status"] == "Paused") == on for b in bricks
                   if b["status"] in RUNNING)

    if _wait(done, a.timeout):
        print(f"session {s.name} {'paused' if on else 'resumed'}")
    else:
        print(f"session {s.name}: {cmd} requested; a worker in its first (hybrid) crawl "
              "takes it at the end of that crawl")
    return EXIT_OK


@_command("pause")
def cmd_pause(a: argparse.Namespace) -> int:
    return _pause(a, True)


@_command("resume")
def cmd_resume(a: argparse.Namespace) -> int:
    return _pause(a, False)


@_command("delete")
def cmd_delete(a: argparse.Namespace) -> int:
    s = Session(a.name).load()
    if s.started or stray_workers(s):
        return _fail("delete", f"session {s.name} is running; stop it first "
                     f"(georep-node stop {s.name})")
    stop_recorders(s)
    if a.reset_sync_time:
        from fsops import marks, xattrs

        for p in s.primaries:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                print(f"georep-node delete: {p}: {e.strerror}; its marks are left",
                      file=sys.stderr)
                continue
            try:
                for which in ("entry_stime", "stime"):
                    xattrs.remove(fd, marks._name(s.name, which))
            finally:
                os.close(fd)
    shutil.rmtree(s.dir)
    print(f"session {s.name} deleted" + (" (sync time reset)" if a.reset_sync_time else ""))
    return EXIT_OK


@_command("status")
def cmd_status(a: argparse.Namespace) -> int:
    doc = status_json(state_root(), a.name)
    if a.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(status_table(doc, a.detail))
    return EXIT_OK


@_command("config")
def cmd_config(a: argparse.Namespace) -> int:
    s = Session(a.name).load()
    if a.reset:
        s.reset(a.reset)
        print(f"{a.reset} reset to its default ({KEYS[a.reset].default!r})")
    elif a.key is None:
        for k in sorted(KEYS):
            note = "" if KEYS[k].used else "    # accepted, not yet used"
            dflt = "" if s.is_set(k) else "    # default"
            print(f"{k}={s.get(k)}{dflt}{note}")
        return EXIT_OK
    elif a.value is None:
        print(s.get(a.key))
        return EXIT_OK
    else:
        v = s.set(a.key, a.value)
        print(f"{a.key}={v}")
    if s.started:
        print(f"(takes effect when the workers restart: georep-node stop {s.name} && "
              f"georep-node start {s.name})")
    return EXIT_OK


@_command("checkpoint")
def cmd_checkpoint(a: argparse.Namespace) -> int:
    s = Session(a.name).load()
    if a.when is None:
        t = s.checkpoint()
        if t is None:
            print("no checkpoint")
        else:
            sd = collect(None, s.name)[0]["checkpoint"]
            state = "completed at " + time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(sd["completion_time"])) \
                if sd and sd["completed"] else "not completed"
            print(f"checkpoint {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} "
                  f"({t:.0f}): {state}")
        return EXIT_OK
    t = parse_checkpoint(a.when)
    s.set_checkpoint(t)
    print(f"checkpoint set to {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} "
          f"({t:.3f})")
    return EXIT_OK


@_command("failures")
def cmd_failures(a: argparse.Namespace) -> int:
    from actors.session import read_json

    s = Session(a.name).load()
    rows: list[dict[str, Any]] = []
    for b in s.bricks():
        doc = read_json(os.path.join(b.state, "failures.json")) or {}
        for f in doc.get("failures", []) if isinstance(doc, dict) else []:
            if isinstance(f, dict):
                rows.append({"brick": b.path, **f})
    if a.json:
        print(json.dumps({"version": 1, "session": s.name, "failures": rows}, indent=2,
                         sort_keys=True))
        return EXIT_OK
    if not rows:
        print(f"session {s.name}: no failures")
    for f in rows:
        err = f" [errno {f['errno']}]" if f.get("errno") else ""
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.get("first_seen") or 0))
        print(f"{f['brick']}: {f.get('kind')} {f.get('op')} {f.get('path')!r}: "
              f"{f.get('message')}{err} (attempts {f.get('attempts', 1)}, since {seen})")
    return EXIT_OK


def _state_dir_arg(a: argparse.Namespace) -> None:
    if getattr(a, "state_dir", None):
        os.environ["GEOREP_STATE_DIR"] = os.path.abspath(a.state_dir)


def cmd_node(a: argparse.Namespace) -> int:
    from actors.node import run_node

    _state_dir_arg(a)

    return run_node(a.foreground)


def cmd_worker(a: argparse.Namespace) -> int:
    from actors.worker import run_worker

    _state_dir_arg(a)

    return run_worker(a.name, a.brick)


# -- parser -------------------------------------------------------------------------------

def add_operator_commands(sub: Any) -> None:
    """Add the operator subcommands to ``georep-node``'s subparsers."""
    c = sub.add_parser(
        "create", help="create a named session (one or more PRIMARY bricks -> SECONDARY)",
        description="Create session NAME replicating the PRIMARY directories (bricks) to "
        "SECONDARY (a local path, [user@]host:/path or ssh://...).  With several PRIMARY "
        "bricks, each goes to SECONDARY/<its last path component>.  Keys: docs/config.md.")
    c.add_argument("name")
    c.add_argument("paths", nargs="+", metavar="PRIMARY... SECONDARY")
    c.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="set a config key (repeatable), e.g. --config sync-jobs=4")
    c.set_defaults(func=cmd_create)

    for name, func, text in (
            ("start", cmd_start, "start replicating session NAME (starts the node supervisor "
             "if needed; returns once every brick's worker is up)"),
            ("pause", cmd_pause, "pause session NAME: its workers finish the current round, "
             "then replicate nothing but keep their connection"),
            ("resume", cmd_resume, "resume a paused session")):
        p = sub.add_parser(name, help=text.split(" (")[0].split(":")[0], description=text)
        p.add_argument("name")
        p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="how long to wait for the workers (default: %(default)s)")
        p.set_defaults(func=func)

    p = sub.add_parser("stop", help="stop session NAME's workers",
                       description="Stop session NAME: SIGTERM its workers (they make their "
                       "last round durable) and wait for them.  The recorder daemons keep "
                       "journaling for recorder-linger seconds (default 600), so a start "
                       "within that time resumes with a History Crawl; --with-recorders stops "
                       "them now (the next start walks the tree: Hybrid Crawl).  Stopping a "
                       "stopped session is not an error.")
    p.add_argument("name")
    p.add_argument("--with-recorders", action="store_true",
                   help="also stop the session's recorder daemons now")
    p.set_defaults(func=cmd_stop)

    d = sub.add_parser("delete", help="delete a stopped session's state",
                       description="Delete session NAME (refused while it runs): its config, "
                       "journal, directory maps, status and logs.  The secondary is untouched.")
    d.add_argument("name")
    d.add_argument("--reset-sync-time", action="store_true",
                   help="also remove the session's marks (entry_stime, stime xattrs) from the "
                   "primary root(s), so a new session of that name starts from scratch")
    d.set_defaults(func=cmd_delete)

    st = sub.add_parser("status", help="status of the sessions' bricks",
                        description="One row per brick: status (Initializing, Active, Paused, "
                        "Faulty, Stopped), crawl, last synced; --detail adds pending counts, "
                        "failures, checkpoint, throughput, resources.  --json: docs/status.md.")
    st.add_argument("name", nargs="?")
    st.add_argument("--detail", action="store_true", help="more columns")
    st.add_argument("--json", action="store_true", help="the documented JSON document")
    st.set_defaults(func=cmd_status)

    cf = sub.add_parser("config", help="show or change a session's config",
                        description="config NAME: every key; config NAME KEY: its value; "
                        "config NAME KEY VALUE: set it (validated); --reset KEY: back to the "
                        "default.  Keys and defaults: docs/config.md.")
    cf.add_argument("name")
    cf.add_argument("key", nargs="?")
    cf.add_argument("value", nargs="?")
    cf.add_argument("--reset", metavar="KEY", help="remove KEY (back to its default)")
    cf.set_defaults(func=cmd_config)

    cp = sub.add_parser("checkpoint", help="set or show a session's checkpoint",
                        description="checkpoint NAME now | \"YYYY-mm-dd HH:MM:SS\" | EPOCH: "
                        "complete once everything changed before that time is on the "
                        "secondary (entry_stime and stime of every brick past it, no older "
                        "failure left); without a time, show it.")
    cp.add_argument("name")
    cp.add_argument("when", nargs="?", metavar="TIME")
    cp.set_defaults(func=cmd_checkpoint)

    fl = sub.add_parser("failures", help="list the items a session could not sync",
                        description="The failure ledger of every brick: items that failed "
                        "and are retried, with errno, message, attempts and first time seen.")
    fl.add_argument("name")
    fl.add_argument("--json", action="store_true")
    fl.set_defaults(func=cmd_failures)

    n = sub.add_parser("node", help="the node supervisor (started by start)",
                       description="Run the node supervisor: one worker per brick of every "
                       "started session, restarted with backoff.  Without --foreground it "
                       "starts the daemon (unless one runs) and returns.  It exits when no "
                       "session is started.  contrib/georep-node.service runs it under systemd.")
    n.add_argument("--foreground", action="store_true", help="do not daemonize")
    n.add_argument("--state-dir", metavar="DIR", help="the state root (default: "
                   "$GEOREP_STATE_DIR, else /var/lib/georep as root, else ~/.local/state/georep)")
    n.set_defaults(func=cmd_node)

    w = sub.add_parser("worker", description="One session brick's worker (run by the node).")
    w.add_argument("name")
    w.add_argument("--brick", required=True)
    w.add_argument("--state-dir")
    w.set_defaults(func=cmd_worker)
