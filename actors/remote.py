"""RemoteProxy: the primary's end of the connection to a secondary host.

The actor owns the secondary host process (a local child, or ssh), does the
handshake, relays the host's stderr into our log as ``remote:`` lines and closes it
all on stop.  Callers send requests on the :class:`transport.Channel` it hands out:
the channel is thread-safe, frames each message, assigns request ids and bounds the
requests in flight, which is the explicit flow control pykka inboxes lack.

When nothing was sent for :data:`PING_INTERVAL` seconds a daemon thread sends
``ping``, so the secondary host (which exits after its ``--timeout`` of silence) knows
the primary is alive.  A failed start or handshake becomes one :class:`ConnectError`
line a person can act on, diagnosed from the ssh exit status and stderr (see
:data:`DIAGNOSES`).
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

import pykka

from actors.inspect import Inspectable
from transport import Channel, spawn_local
from transport.endpoint import Endpoint, local_host_argv, ssh_host_argv
from transport.errors import ConnectionLost, HandshakeError, ProtocolError, RemoteError

log = logging.getLogger("georep.remote")
remote_log = logging.getLogger("georep.remote.host")

#: Seconds of silence after which the primary pings (the secondary's default timeout is 120).
PING_INTERVAL = 30.0
#: stderr lines of the host (or ssh) kept to explain a failed connection.
STDERR_TAIL = 20


class ConnectError(Exception):
    """The secondary host could not be started or did not complete the handshake."""


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """How to explain one kind of failed start: which exit status, which stderr line."""

    status: int | None  # exit status it applies to; None: any
    pattern: re.Pattern[str]
    message: str  # format fields: target (user@host), host, line (the matching line), status

    def match(self, status: int | None, lines: list[str]) -> str | None:
        """The one-line explanation, or None when this diagnosis does not apply."""
        if self.status is not None and status != self.status:
            return None
        for line in reversed(lines):
            if self.pattern.search(line):
                return line
        return None


_NOT_INSTALLED = ("georep-node is not installed on {host} (exit {status}: {line}); install "
                  "it there or pass --remote-command /path/to/georep-node")

#: Known ways for ``ssh host georep-node secondary`` to fail, checked in order.
DIAGNOSES: tuple[Diagnosis, ...] = (
    Diagnosis(255, re.compile(r"Host key verification failed|REMOTE HOST IDENTIFICATION"),
              "ssh does not trust the host key of {target}: {line}; check it and add it to "
              "known_hosts"),
    Diagnosis(255, re.compile(r"Permission denied|Too many authentication failures|"
                              r"no matching host key type|Authentication failed"),
              "ssh authentication to {target} refused: {line} (authorize this host's key in "
              "the remote authorized_keys, or pick the key with --ssh-command 'ssh -i KEY')"),
    Diagnosis(255, re.compile(r"Connection refused|timed out|No route to host|unreachable|"
                              r"Could not resolve hostname|Name or service not known|"
                              r"Temporary failure in name resolution|Connection closed|"
                              r"Connection reset"),
              "cannot reach secondary host {host}: {line}"),
    Diagnosis(127, re.compile(r"."), _NOT_INSTALLED),
    Diagnosis(None, re.compile(r"command not found"), _NOT_INSTALLED),
    Diagnosis(126, re.compile(r"."),
              "the remote command cannot be run on {host} (exit 126: {line}); check "
              "--remote-command"),
    Diagnosis(None, re.compile(r"^georep secondary: "), "{host}: {line}"),
    Diagnosis(255, re.compile(r"^ssh: |^kex_|^Connection "), "ssh to {target} failed: {line}"),
)


def diagnose(endpoint: Endpoint, status: int | None, lines: list[str], reason: str) -> str:
    """One line explaining why the secondary host did not shake hands."""
    host = endpoint.host or "localhost"
    target = f"{endpoint.user}@{host}" if endpoint.user else host
    for d in DIAGNOSES:
        line = d.match(status, lines)
        if line is not None:
            return d.message.format(host=host, target=target, line=line.strip(),
                                    status=status)
    said = f"; it said: {lines[-1]}" if lines else ""
    how = f"exit status {status}" if status is not None else "still running"
    return f"{reason} ({how}{said})"


class RemoteProxy(Inspectable, pykka.ThreadingActor):
    """Starts and owns one secondary host process and its channel."""

    def __init__(self, endpoint: Endpoint, *, ssh_command: str = "ssh",
                 remote_command: str = "georep-node", handshake_timeout: float = 30.0,
                 max_in_flight: int = 64, identity: dict[str, Any] | None = None,
                 ping_interval: float = PING_INTERVAL) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.ssh_command = ssh_command
        self.remote_command = remote_command
        self.handshake_timeout = handshake_timeout
        self.max_in_flight = max_in_flight
        self.identity = dict(identity or {})
        self.ping_interval = ping_interval
        self.process: subprocess.Popen[bytes] | None = None
        self._channel: Channel | None = None
        self.hello: dict[str, Any] = {}
        self.lost_reason: str | None = None
        self._stderr_tail: list[str] = []
        self._stop_pinging = threading.Event()

    def _argv(self) -> list[str]:
        if self.endpoint.is_local:
            return local_host_argv(self.endpoint.path)
        return ssh_host_argv(self.endpoint, ssh_command=self.ssh_command,
                             remote_command=self.remote_command)

    def _on_stderr(self, line: bytes) -> None:
        text = line.decode("utf-8", "backslashreplace").rstrip()
        if text:
            self._stderr_tail = [*self._stderr_tail[-(STDERR_TAIL - 1):], text]
            remote_log.info("remote: %s", text)

    def _on_lost(self, reason: str) -> None:
        # Runs in the channel's reader thread: record only, never ask an actor.
        self.lost_reason = reason
        log.info("connection to %s lost: %s", self.endpoint, reason)

    def connect(self) -> dict[str, Any]:
        """Start the secondary host and shake hands; returns the host's hello.

        Raises ConnectError with one line a person can act on.
        """
        argv = self._argv()
        log.debug("starting secondary host: %s", argv)
        try:
            self.process, self._channel = spawn_local(
                argv, stderr_handler=self._on_stderr, max_in_flight=self.max_in_flight,
                on_closed=self._on_lost)
        except OSError as e:
            raise ConnectError(f"cannot start {argv[0]!r}: {e.strerror}")
        try:
            self.hello = self._channel.handshake(self.handshake_timeout,
                                                 identity=self.identity)
        except Exception as e:
            raise ConnectError(self._explain(e))
        self._stop_pinging.clear()
        threading.Thread(target=self._keepalive, args=(self._channel,),
                         name="georep-keepalive", daemon=True).start()
        return self.hello

    def _explain(self, exc: Exception) -> str:
        """Close the failed connection and say why it failed."""
        where = "" if self.endpoint.is_local else f"{self.endpoint.host}: "
        if isinstance(exc, RemoteError) and not isinstance(exc, ProtocolError | ConnectionLost):
            self._close()
            return f"{where}{exc}"  # the host's own answer to hello (root refused, locked)
        pid = self.process.pid if self.process else None
        status = self._close()
        self._wait_stderr(pid)
        if isinstance(exc, HandshakeError) and "junk on stdout" in str(exc):
            return (f"{where}{exc}: a login banner or shell start-up file prints text for "
                    "non-interactive sessions; make it print nothing there")
        return diagnose(self.endpoint, status, self._stderr_tail, str(exc))

    @staticmethod
    def _wait_stderr(pid: int | None, timeout: float = 5.0) -> None:
        # transport.spawn_local names its stderr relay thread "stderr-<pid>"; once the
        # process is gone the relay ends at EOF, and the tail holds every line.
        for t in threading.enumerate():
            if t.name == f"stderr-{pid}":
                t.join(timeout)

    def _keepalive(self, channel: Channel) -> None:
        last = -1
        while not self._stop_pinging.wait(self.ping_interval):
            if channel.closed:
                return
            if channel.frames_sent == last:
                try:
                    channel.call_async("ping", {}, timeout=1.0)
                except (ConnectionLost, TimeoutError, ProtocolError):
                    pass  # lost: the reader reports it; full: requests are flowing anyway
            last = channel.frames_sent

    def channel(self) -> Channel:
        """The connected channel (thread-safe; use it directly from any actor)."""
        if self._channel is None:
            raise ConnectError("not connected")
        return self._channel

    def inspect_extra(self) -> dict[str, Any]:
        """The connection (read from the inspecting thread: reads only)."""
        ch = self._channel
        return {"endpoint": str(self.endpoint), "pid": self.process.pid if self.process else None,
                "lost": self.lost_reason, **(ch.stats() if ch is not None else {})}

    def stats(self) -> dict[str, Any]:
        """Frames and bytes moved, and the host's pid."""
        out: dict[str, Any] = dict(self._channel.stats()) if self._channel else {}
        out["pid"] = self.process.pid if self.process else None
        return out

    def _close(self) -> int | None:
        """Close the channel and reap the process; returns its exit status."""
        self._stop_pinging.set()
        if self._channel is not None:
            try:
                self._channel.close()
            except Exception:  # closing a dead channel must not mask the real error
                log.debug("closing channel failed", exc_info=True)
            self._channel = None
        status = None
        if self.process is not None:
            try:
                status = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                status = self.process.wait(timeout=10)
            self.process = None
        return status

    def on_stop(self) -> None:
        self._close()

    def on_failure(self, *exc_info: Any) -> None:
        self._close()
