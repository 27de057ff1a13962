"""``georep-node``: the one command of georep.

Subcommands in this version:

- ``sync PRIMARY SECONDARY --once``: make SECONDARY an exact replica of PRIMARY now.
- ``secondary --root PATH``: the secondary host, started by the primary over a local
  pipe or ssh; it speaks the protocol on stdio and is not for people.
- ``ssh-key --root PATH``: print an authorized_keys line that restricts a key to the
  secondary host of one root (docs/ssh.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pykka

if TYPE_CHECKING:
    from actors.supervisor import Summary

EXIT_OK, EXIT_FAILURES, EXIT_ERROR = 0, 1, 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_summary(s: Summary) -> None:
    c, t = s.counters, s.transfer
    state = "converged" if s.ok else f"NOT converged, {len(s.failures)} failure(s)"
    print(f"georep: {s.primary} -> {s.secondary}: {state} in {s.seconds:.2f} s "
          f"({s.passes} pass{'es' if s.passes != 1 else ''})")
    print(f"  scanned   {c.get('scanned', 0)} entries in {c.get('dirs_scanned', 0)} directories")
    print("  entries   " + ", ".join(
        f"{k} {c.get(k, 0)}" for k in ("created", "linked", "renamed", "adopted", "deleted",
                                       "kept", "meta")))
    print(f"  data      {c.get('data_files', 0)} files pushed: {_human(t.get('bytes_sent', 0))} "
          f"sent, {_human(t.get('bytes_matched', 0))} already there (delta), "
          f"{t.get('holes_punched', 0)} holes punched; inline {c.get('inline_files', 0)} "
          f"small files, {_human(c.get('inline_bytes', 0))}")
    if c.get("purged"):
        print(f"  purged    {c['purged']} deleted objects from the secondary")
    for f in s.failures:
        print(f"  FAILED    {f.line()}", file=sys.stderr)


def _session_log(state: str) -> None:
    """Continuous mode also logs, one line per event, to the session's log file."""
    from fsops.dirmap import make_private_dirs

    make_private_dirs(state)
    import logging.handlers

    h = logging.handlers.WatchedFileHandler(os.path.join(state, "georep.log"))
    h.setFormatter(logging.Formatter(LOG_FORMAT))
    h.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(h)
    root.setLevel(min(root.level, logging.INFO))


def _prestart_secondary(a: argparse.Namespace) -> None:
    """Start the secondary host (local, or ssh and its authentication) right away, so that
    it starts while this process loads its pipeline; the first connect takes it."""
    from transport.channel import prestart
    from transport.endpoint import (
        EndpointError,
        local_host_argv,
        parse_secondary,
        session_ssh_command,
        ssh_host_argv,
    )

    try:
        ep = parse_secondary(a.secondary)
    except EndpointError:
        return  # reported by the Supervisor, with the other start-up errors
    if ep.is_local:
        prestart(local_host_argv(ep.path))
    else:
        prestart(ssh_host_argv(ep, ssh_command=session_ssh_command(
            a.ssh_command, compress=a.compress), remote_command=a.remote_command))


def cmd_sync(a: argparse.Namespace) -> int:
    _prestart_secondary(a)
    try:
        return _sync(a)
    finally:
        from transport.channel import discard_prestarted

        discard_prestarted()


def _sync(a: argparse.Namespace) -> int:
    # The primary's pipeline is imported here, not at the top: ``georep-node secondary``,
    # started once per connection, then loads only the secondary host's modules.
    from actors.ledger import Failure
    from actors.remote import ConnectError
    from actors.supervisor import Supervisor, SyncOptions
    from fsops.primary import PrimaryError
    from fsops.recorder import RecorderError
    from fsops.safety import SafetyStop
    from transport.endpoint import EndpointError

    opts = SyncOptions(primary=a.primary, secondary=a.secondary, jobs=a.jobs,
                       retries=a.retries, timeout=a.timeout, session=a.session,
                       ssh_command=a.ssh_command, remote_command=a.remote_command,
                       force=a.force, state_dir=a.state_dir, engine=a.engine,
                       bwlimit=a.bwlimit, compress=a.compress,
                       allow_empty_primary=a.allow_empty_primary,
                       exclude=tuple(a.exclude), ignore_deletes=a.ignore_deletes,
                       sync_xattrs=a.sync_xattrs, sync_acls=a.sync_acls,
                       secondary_timeout=a.secondary_timeout)
    stop = threading.Event()
    if not a.once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        sup = Supervisor.start(opts)
        try:
            if a.once:
                summary: Summary = sup.proxy().run_once().get()
            else:
                _session_log(sup.proxy().state_path().get())
                fut = sup.proxy().run_live(stop)
                while True:
                    try:
                        summary = fut.get(timeout=0.5)
                        break
                    except pykka.Timeout:
                        continue
        finally:
            sup.stop()
    except (PrimaryError, ConnectError, EndpointError, RecorderError, SafetyStop) as e:
        print(f"georep-node sync: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        pykka.ActorRegistry.stop_all(block=True, timeout=30)
    if a.json:
        print(json.dumps(summary.as_dict(), indent=2, sort_keys=True))
    else:
        _print_summary(summary)
    if not summary.ok:
        first: Failure = summary.failures[0]
        if not a.once:
            # A stop is not a verdict: the items are in the durable failure ledger and are
            # retried when the session runs again (they are listed above).
            print(f"georep-node sync: stopped with {len(summary.failures)} item(s) pending "
                  f"retry, first: {first.line()}", file=sys.stderr)
            return EXIT_OK
        print(f"georep-node sync: {len(summary.failures)} item(s) could not be synced, "
              f"first: {first.line()}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


def cmd_recorder(a: argparse.Namespace) -> int:
    from actors.recorder_host import run_recorder

    _session_log(a.state)
    return run_recorder(a.primary, a.state, a.linger)


def cmd_secondary(a: argparse.Namespace) -> int:
    from actors.secondary_host import run_host

    if a.root is None and a.restrict_root is None:
        print("georep-node secondary: --root or --restrict-root is required", file=sys.stderr)
        return EXIT_ERROR
    return run_host(a.root, timeout=a.timeout, restrict_root=a.restrict_root)


def authorized_keys_line(public_key: str, root: str, remote_command: str) -> str:
    """The ``authorized_keys`` line that lets ``public_key`` run only the secondary host
    of ``root`` (sshd's ``restrict`` turns off forwarding, pty and the like)."""
    fields = public_key.split()
    if len(fields) < 2 or not fields[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise ValueError("not an OpenSSH public key")
    command = f"{remote_command} secondary --restrict-root {shlex.quote(root)}"
    command = command.replace("\\", "\\\\").replace('"', '\\"')
    return f'restrict,command="{command}" {" ".join(fields)}'


def cmd_shell(a: argparse.Namespace) -> int:
    from actors.shell import run_shell

    return run_shell(a.name, socket_path=a.socket, command=a.command, state_root=a.state_dir)


def cmd_ssh_key(a: argparse.Namespace) -> int:
    key = os.path.expanduser(a.key)
    private = key[:-4] if key.endswith(".pub") else key
    public = private + ".pub"
    if not os.path.exists(public):
        if not a.generate:
            print(f"georep-node ssh-key: no public key at {public}; pass --generate to "
                  "create the key pair", file=sys.stderr)
            return EXIT_ERROR
        if os.path.exists(private):
            print(f"georep-node ssh-key: {private} exists but {public} does not; "
                  f"recreate it with: ssh-keygen -y -f {private} > {public}", file=sys.stderr)
            return EXIT_ERROR
        os.makedirs(os.path.dirname(private) or ".", 0o700, exist_ok=True)
        done = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                               f"georep@{socket.gethostname()}", "-f", private],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"georep-node ssh-key: ssh-keygen: {why}", file=sys.stderr)
            return EXIT_ERROR
        print(f"georep-node ssh-key: created {private} and {public}", file=sys.stderr)
    try:
        with open(public, encoding="utf-8") as f:
            line = authorized_keys_line(f.read().strip(), a.root, a.remote_command)
    except (OSError, ValueError) as e:
        print(f"georep-node ssh-key: {public}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return EXIT_ERROR
    print(line)
    return EXIT_OK


def _rate(text: str) -> int:
    try:
        from actors.engines import parse_rate

        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not v >= 1:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 1, not {text!r}")
    return v


def _add_secondary(sub: Any) -> None:
    h = sub.add_parser("secondary", help="serve as the secondary host on stdio (not for people)",
                       description="Secondary host: speaks georep's protocol on stdin/stdout "
                       "and writes only beneath --root.  Started by the primary.")
    h.add_argument("--root", help="the secondary root directory")
    h.add_argument("--restrict-root", metavar="PATH",
                   help="serve only PATH, whatever root the client asks for (the forced "
                   "command of an authorized_keys line; see ssh-key)")
    h.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="exit after this long without a request from the primary, which "
                   "pings every 30 s when idle (default: %(default)s)")
    h.set_defaults(func=cmd_secondary)


def _add_sync(sub: Any) -> None:
    s = sub.add_parser(
        "sync", help="replicate PRIMARY to SECONDARY",
        description="Make SECONDARY an exact replica of the directory PRIMARY: content, "
        "owners, modes, ns times, xattrs, ACLs, hardlinks, symlinks, sparse files, "
        "special files.  Objects keep their identity (gfid), so renames are applied as "
        "renames.  Exit status: 0 converged (continuous mode: stopped cleanly; items still "
        "failing are kept in the failure ledger and retried on the next start), 1 some "
        "items failed (--once; listed), 2 could not run.")
    s.add_argument("primary", help="the directory to replicate")
    s.add_argument("secondary", help="replica root: a local path, [user@]host:/path or "
                   "ssh://[user@]host[:port]/path (the secondary host runs as a local "
                   "child process, or over one ssh connection)")
    s.add_argument("--once", action="store_true",
                   help="crawl, sync and exit; without it, keep replicating every change "
                   "within about a second until SIGTERM or Ctrl-C (a recorder daemon keeps "
                   "the change journal meanwhile, so a restart replays only what changed)")
    s.add_argument("--state-dir", metavar="DIR",
                   help="continuous mode: where sessions keep their journal, directory "
                   "map and log (default: $GEOREP_STATE_DIR, else /var/lib/georep as root, "
                   "else ~/.local/state/georep)")
    s.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="parallel data transfers (default: %(default)s)")
    s.add_argument("--retries", type=int, default=1, metavar="N",
                   help="extra passes that retry failed items (default: %(default)s)")
    s.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="longest wait for one reply from the secondary (default: %(default)s)")
    s.add_argument("--session", metavar="NAME",
                   help="name under which marks are kept on the primary root "
                        "(default: derived from PRIMARY and SECONDARY)")
    s.add_argument("--ssh-command", default="ssh", metavar="CMD",
                   help="the ssh client and its options for a remote SECONDARY, e.g. "
                   "\"ssh -p 2222 -i ~/.ssh/georep -o ...\" (default: %(default)s; georep adds "
                   "BatchMode, ConnectTimeout and ServerAliveInterval, and on a CPU with AES puts "
                   "AES-GCM first in the cipher list unless ciphers were chosen, e.g. with "
                   "-c; see docs/ssh.md)")
    s.add_argument("--remote-command", default="georep-node", metavar="CMD",
                   help="how to run georep-node on the secondary host, as a shell command "
                   "(default: %(default)s, found in the remote PATH)")
    s.add_argument("--allow-empty-primary", action="store_true",
                   help="confirm that PRIMARY really is empty, or really moved to another "
                   "device: without it, a primary root that vanished, is empty while the "
                   "secondary is not, changed device or type stops the sync (exit 2; "
                   "continuous mode: Faulty until the root is back) instead of deleting "
                   "the secondary (docs/recovery.md)")
    s.add_argument("--force", action="store_true",
                   help="take over the secondary's session lock even when its holder is "
                   "alive (the holder exits); use only when that session is known dead")
    from actors.engines import ENGINES, NATIVE

    s.add_argument("--engine", choices=ENGINES, default=NATIVE,
                   help="how file data travels: native (georep's block delta on its own "
                   "connection), rsync (rsync --inplace per batch of files, over its own ssh) "
                   "or tarssh (tar | ssh tar -x --overwrite per batch); entries, gfids and "
                   "meta always go through georep (default: %(default)s; docs/ssh.md)")
    s.add_argument("--bwlimit", type=_rate, metavar="RATE",
                   help="limit file data to RATE bytes/s for all transfers together; "
                   "suffixes K, M, G (binary): 512K, 10M")
    s.add_argument("--compress", action="store_true",
                   help="ssh compression (-C): helps on slow links, costs CPU and "
                   "throughput on fast ones")
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="do not replicate entries matching this glob (repeatable): a "
                   "pattern without '/' matches names at any depth, one with '/' the path "
                   "relative to PRIMARY, a trailing '/' only directories; an excluded "
                   "directory is not descended, and what the secondary holds under an "
                   "excluded name is left there (docs/config.md)")
    s.add_argument("--ignore-deletes", action="store_true",
                   help="do not propagate deletes: what is removed from PRIMARY stays on "
                   "SECONDARY (renames are still applied; see docs/config.md)")
    s.add_argument("--no-xattrs", dest="sync_xattrs", action="store_false",
                   help="do not replicate extended attributes other than POSIX ACLs; those "
                   "of SECONDARY are left alone")
    s.add_argument("--no-acls", dest="sync_acls", action="store_false",
                   help="do not replicate POSIX ACLs; those of SECONDARY are left alone")
    s.add_argument("--secondary-timeout", type=_seconds, metavar="SECONDS",
                   help="the secondary host exits after this long without a request "
                   "(default: its own, 120; the primary pings often enough)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_sync)


def _top_parser() -> tuple[argparse.ArgumentParser, Any]:
    p = argparse.ArgumentParser(
        prog="georep-node",
        description="Continuous, asynchronous geo-replication of Linux directory trees.")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output on stderr (-v info, -vv debug)")
    return p, p.add_subparsers(dest="command", required=True, metavar="COMMAND")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; its help texts are the reference of every option."""
    p, sub = _top_parser()
    _add_sync(sub)

    r = sub.add_parser("recorder", help="record the changes of a primary (started by sync)",
                       description="Recorder daemon: journals every change under --primary "
                       "(fanotify as root, inotify otherwise) into --state/journal.  Started "
                       "by a continuous sync; exits on SIGTERM or after --linger seconds with "
                       "no sync worker.")
    r.add_argument("--primary", required=True)
    r.add_argument("--state", required=True, help="the session's state directory")
    r.add_argument("--linger", type=float, default=600.0, metavar="SECONDS",
                   help="exit after this long without a worker heartbeat; 0: never "
                   "(default: %(default)s)")
    r.set_defaults(func=cmd_recorder)

    _add_secondary(sub)

    k = sub.add_parser(
        "ssh-key", help="print an authorized_keys line restricted to one secondary root",
        description="Print the line to add to ~/.ssh/authorized_keys on the secondary host "
        "so that this host's key can only run the georep secondary host for --root: "
        "restrict,command=\"CMD secondary --restrict-root PATH\" KEY.  See docs/ssh.md.")
    k.add_argument("--key", default="~/.ssh/id_ed25519.pub", metavar="PATH",
                   help="the public key (default: %(default)s)")
    k.add_argument("--root", required=True, metavar="PATH",
                   help="the secondary root on the remote host")
    k.add_argument("--remote-command", default="georep-node", metavar="CMD",
                   help="how sshd runs georep-node on the secondary host; an absolute path "
                   "is safest (default: %(default)s)")
    k.add_argument("--generate", action="store_true",
                   help="create the ed25519 key pair with ssh-keygen when it is missing")
    k.set_defaults(func=cmd_ssh_key)

    from actors.opcli import add_operator_commands

    add_operator_commands(sub)  # create, start, stop, status... (actors/opcli.py)

    i = sub.add_parser(
        "shell", help="inspect a running worker: its actors, batches, failures, resources",
        description="Attach to a running worker through its control socket "
        "(<state>/control.sock) and list the actors of the worker and of its secondary "
        "host, show one actor, batches in flight, failures and resources, restart an "
        "actor, pause or resume the session.  Interactive on a terminal (history, tab "
        "completion); one command per line from a pipe.  Exit status with --command: 0 "
        "done, 1 the command failed, 2 the worker cannot be reached.")
    i.add_argument("name", nargs="?", metavar="NAME",
                   help="session name or id, state directory or socket path (default: the "
                   "only running session)")
    i.add_argument("--command", "-c", metavar="CMD", help="run one command and exit")
    i.add_argument("--socket", metavar="PATH", help="the control socket to attach to")
    i.add_argument("--state-dir", metavar="DIR", help="where sessions keep their state "
                   "(default: as for sync)")
    i.set_defaults(func=cmd_shell)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``georep-node``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((x for x in argv if not x.startswith("-")), None)
    if command in ("secondary", "sync"):
        # The secondary host (started for every connection) and sync: a parser of that
        # one command spares them the operator commands' imports (same options, same help).
        p, sub = _top_parser()
        (_add_secondary if command == "secondary" else _add_sync)(sub)
    else:
        p = build_parser()
    args = p.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
