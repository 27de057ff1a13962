"""``georep-node shell``: look inside a running worker through its control socket.

Interactive on a terminal (prompt_toolkit: history in ``~/.georep_shell_history``, tab
completion of commands and actor names); one command per line from a pipe; or one
command with ``--command`` (exit 0, or 1 with a one-line message when it fails, 2 when
the worker cannot be reached).  The requests are those of :mod:`actors.control`.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from actors.control import CONTROL_SOCKET, ControlClient, ControlError, connect
from fsops.dirmap import default_state_root
from transport.errors import ProtocolError

HISTORY_FILE = "~/.georep_shell_history"
EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2

HELP = """\
commands:
  actors          the actors of the worker and of its secondary host
  actor NAME      one actor: counters, recent messages, extras
  batches         requests in flight, the Batcher's pending ops, the Syncers' queues
  failures        the items that failed (the ledger)
  resources       CPU, memory, threads, fds of the worker, secondary host, recorder
  restart NAME    restart Crawler/Batcher/Syncer (the pipeline) or RemoteProxy/
                  EntryApplier/Lister (the connection too), between rounds
  pause, resume   stop or restart the rounds (the recorder keeps journaling)
  help, quit"""

COMMANDS = ("help", "actors", "actor", "batches", "failures", "resources", "restart",
            "pause", "resume", "quit", "exit")


class ShellError(Exception):
    """A command the shell cannot run (bad usage, worker unreachable)."""


# -- finding the socket ----------------------------------------------------------------------

def _sockets_under(root: str, depth: int = 5) -> list[str]:
    found = []
    base = root.rstrip("/").count("/")
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath.count("/") - base >= depth:
            dirnames[:] = []
        if CONTROL_SOCKET in filenames:
            found.append(os.path.join(dirpath, CONTROL_SOCKET))
    return sorted(found)


def _alive(path: str) -> bool:
    try:
        connect(path, timeout=1.0).close()
    except OSError:
        return False
    return True


def resolve_socket(name: str | None, socket_path: str | None,
                   state_root: str | None = None) -> str:
    """The control socket to use: ``--socket``, else the session NAME, else the only one.

    NAME is a session name or id (a directory under ``<state>/sessions``), a state
    directory, or a socket path.
    """
    if socket_path:
        return (os.path.join(socket_path, CONTROL_SOCKET) if os.path.isdir(socket_path)
                else socket_path)
    if name and os.path.exists(name):
        return os.path.join(name, CONTROL_SOCKET) if os.path.isdir(name) else name
    root = state_root or default_state_root()
    sockets = [s for s in _sockets_under(root) if _alive(s)]
    if name:
        sockets = [s for s in sockets
                   if name in os.path.relpath(os.path.dirname(s), root).split(os.sep)]
        if not sockets:
            raise ShellError(f"no running session named {name!r} under {root}")
    if len(sockets) == 1:
        return sockets[0]
    if not sockets:
        raise ShellError(f"no running session under {root} (pass NAME or --socket)")
    names = ", ".join(os.path.relpath(os.path.dirname(s), root) for s in sockets)
    raise ShellError(f"{len(sockets)} running sessions ({names}): name one")


# -- formatting ------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows under their headers, columns aligned, ``-`` for missing values."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in cells]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def _human(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if f < 1024 or unit == "GiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return str(n)


def _error(e: dict[str, Any] | None) -> str | None:
    if not e:
        return None
    return f"{e['type']}: {e['message']}"[:60] + f" ({e['age']:.0f}s ago)"


def fmt_actors(r: dict[str, Any]) -> str:
    paused = ("PAUSED" if r.get("paused_now") else "pausing" if r.get("paused")
              else "running")
    head = (f"session {r['session']} ({paused}, {r.get('mode') or '-'}, pipeline "
            f"#{r.get('generation')})  {r.get('primary')} -> {r.get('secondary')}")
    rows = []
    for side, actors in (("worker", r["worker"]), ("secondary", r["secondary_actors"] or [])):
        for a in actors:
            rows.append((side, a["name"], a["state"], a["mailbox"], a["handled"], a["in_hand"],
                         a["in_hand_age"], _error(a["last_error"])))
    out = head + "\n" + table(("SIDE", "ACTOR", "STATE", "MAILBOX", "HANDLED", "IN HAND",
                               "FOR (s)", "LAST ERROR"), rows)
    if r.get("secondary_error"):
        out += f"\nsecondary: unavailable ({r['secondary_error']})"
    return out


def fmt_actor(r: dict[str, Any]) -> str:
    parts = []
    for a in r["actors"]:
        lines = [f"{a['side']} {a['name']} ({a['urn'].rsplit(':', 1)[-1][:8]}): {a['state']}, "
                 f"mailbox {a['mailbox']}, {a['handled']} handled, up {a['age']:.0f} s"]
        if a.get("in_hand"):
            lines.append(f"  in hand: {a['in_hand']} for {a['in_hand_age']:.3f} s")
        if a.get("last_error"):
            lines.append(f"  last error: {_error(a['last_error'])}")
        extra = a.get("extra") or {}
        if extra:
            lines.append("  " + ", ".join(f"{k} {_cell(v)}" for k, v in extra.items()))
        counts = sorted((a.get("counts") or {}).items(), key=lambda kv: -kv[1])
        if counts:
            lines.append(table(("  METHOD", "COUNT"), [(f"  {k}", v) for k, v in counts]))
        recent = a.get("recent") or []
        if recent:
            lines.append(table(("  RECENT", "AGO (s)", "TOOK (s)", "FAILED"),
                               [(f"  {m['method']}", m["ago"], f"{m['seconds']:.6f}",
                                 "yes" if m["failed"] else "")
                                for m in reversed(recent)]))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def fmt_batches(r: dict[str, Any]) -> str:
    ch = r.get("channel")
    lines = ["channel: not connected" if ch is None else
             f"channel: {ch['in_flight']} request(s) in flight; sent {ch['frames_sent']} frames "
             f"({_human(ch['bytes_sent'])}), received {ch['frames_received']} "
             f"({_human(ch['bytes_received'])})"]
    for b in r.get("batcher") or []:
        lines.append(f"batcher: {b['pending_ops']} ops pending ({_human(b['pending_bytes'])} "
                     f"inline), {b['pending_data_jobs']} data jobs, {b['pending_listings']} "
                     f"ordered listings, {b['batches_unanswered']} batch(es) unanswered")
    syncers = r.get("syncers") or []
    if syncers:
        lines.append(table(("SYNCER", "QUEUED", "BYTES SENT", "MATCHED"),
                           [(f"Syncer#{i + 1}", s["mailbox"], _human(s.get("bytes_sent")),
                             _human(s.get("bytes_matched"))) for i, s in enumerate(syncers)]))
    return "\n".join(lines)


def fmt_failures(r: dict[str, Any]) -> str:
    rows = r["failures"]
    if not rows:
        return "no failures"
    return f"{len(rows)} failure(s)\n" + table(
        ("KIND", "OP", "PATH", "ERRNO", "TRIES", "MESSAGE"),
        [(f["kind"], f["op"], f["path"], f["errno"], f["attempts"], f["message"][:60])
         for f in rows])


def fmt_resources(r: dict[str, Any]) -> str:
    rows = [(p["role"], p.get("pid"), p.get("cpu_percent"), p.get("cpu_seconds"),
             _human(p.get("rss")), p.get("threads"), p.get("fds"), p.get("uptime"),
             p.get("error") or p.get("host")) for p in r["processes"]]
    out = table(("PROCESS", "PID", "CPU %", "CPU s", "RSS", "THREADS", "FDS", "UP (s)", "NOTE"),
                rows)
    if r.get("secondary_error"):
        out += f"\nsecondary: unavailable ({r['secondary_error']})"
    return out


def _message(r: dict[str, Any]) -> str:
    return str(r.get("message", r))


# -- the shell -------------------------------------------------------------------------------

class Shell:
    """Runs shell commands against one control socket (reconnecting when the worker did)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.client: ControlClient | None = None
        self.actor_names: set[str] = set()

    def _call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        for attempt in (1, 2):
            try:
                if self.client is None:
                    self.client = ControlClient(self.path)
                return self.client.call(method, args)
            except (OSError, ControlError, ProtocolError) as exc:
                if isinstance(exc, ControlError) and "closed" not in str(exc):
                    raise
                if self.client is not None:
                    self.client.close()
                    self.client = None
                if attempt == 2:
                    raise ShellError(f"cannot reach the worker at {self.path}: {exc}")
        raise AssertionError("unreachable")

    def run(self, line: str) -> str | None:
        """Run one command line; its output, or None for ``quit``."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise ShellError(str(exc))
        if not words:
            return ""
        cmd, rest = words[0].lower(), words[1:]
        if cmd in ("quit", "exit"):
            return None
        if cmd == "help":
            return HELP
        one_name: dict[str, Callable[[dict[str, Any]], str]] = {
            "actor": fmt_actor, "restart": _message}
        no_args: dict[str, Callable[[dict[str, Any]], str]] = {
            "actors": fmt_actors, "batches": fmt_batches, "failures": fmt_failures,
            "resources": fmt_resources, "pause": _message, "resume": _message}
        if cmd in one_name:
            if len(rest) != 1:
                raise ShellError(f"usage: {cmd} NAME")
            return one_name[cmd](self._call(cmd, {"name": rest[0]}))
        if cmd in no_args:
            if rest:
                raise ShellError(f"usage: {cmd}")
            result = self._call(cmd)
            if cmd == "actors":
                self.actor_names = {a["name"] for a in
                                    [*result["worker"], *(result["secondary_actors"] or [])]}
            return no_args[cmd](result)
        raise ShellError(f"unknown command {cmd!r} (try: help)")

    def prompt(self) -> str:
        """The prompt: the session's name."""
        try:
            info = self._call("session")
        except (ShellError, ControlError):
            return "georep> "
        return f"georep:{info['session']}> "

    def close(self) -> None:
        """Hang up."""
        if self.client is not None:
            self.client.close()


def _interactive(shell: Shell) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory

    def words() -> list[str]:
        return [*COMMANDS, *sorted(shell.actor_names)]

    try:
        shell.run("actors")  # learn the actor names for completion
    except (ShellError, ControlError):
        pass
    session: PromptSession[str] = PromptSession(
        history=FileHistory(os.path.expanduser(HISTORY_FILE)),
        completer=WordCompleter(words, ignore_case=True))
    text = shell.prompt()
    while True:
        try:
            line = session.prompt(text)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return EXIT_OK
        if not _run_printing(shell, line):
            return EXIT_OK


def _run_printing(shell: Shell, line: str) -> bool:
    """Run a line, print its output or error; False once the user quits."""
    try:
        out = shell.run(line)
    except (ShellError, ControlError) as exc:
        print(f"error: {exc}", flush=True)
        return True
    if out is None:
        return False
    if out:
        print(out, flush=True)
    return True


def run_shell(name: str | None, *, socket_path: str | None = None, command: str | None = None,
              state_root: str | None = None) -> int:
    """Entry point of ``georep-node shell``; returns the exit status."""
    try:
        path = resolve_socket(name, socket_path, state_root)
    except ShellError as exc:
        print(f"georep-node shell: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    shell = Shell(path)
    try:
        if command is not None:
            try:
                out = shell.run(command)
            except ShellError as exc:
                print(f"georep-node shell: {exc}", file=sys.stderr)
                return EXIT_UNREACHABLE if "cannot reach" in str(exc) else EXIT_FAILED
            except ControlError as exc:
                print(f"georep-node shell: {exc}", file=sys.stderr)
                return EXIT_FAILED
            if out:
                print(out)
            return EXIT_OK
        if sys.stdin.isatty() and sys.stdout.isatty():
            return _interactive(shell)
        for line in sys.stdin:
            if not _run_printing(shell, line):
                break
        return EXIT_OK
    finally:
        shell.close()


def wait_for_socket(path: str, timeout: float) -> bool:
    """True once a worker answers on ``path`` (for scripts and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _alive(path):
            return True
        time.sleep(0.05)
    return False
