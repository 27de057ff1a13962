"""RemoteProxy: the primary's end of the connection to a secondary host.

The actor owns the secondary host process (a local child, or ssh), does the
handshake, relays the host's stderr into our log as ``remote:`` lines and closes it
all on stop.  Callers send requests on the :class:`transport.Channel` it hands out:
the channel is thread-safe, frames each message, assigns request ids and bounds the
requests in flight, which is the explicit flow control pykka inboxes lack.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Any

import pykka

from transport import Channel, spawn_local
from transport.endpoint import Endpoint, local_host_argv, ssh_host_argv

log = logging.getLogger("georep.remote")
remote_log = logging.getLogger("georep.remote.host")


class ConnectError(Exception):
    """The secondary host could not be started or did not complete the handshake."""


class RemoteProxy(pykka.ThreadingActor):
    """Starts and owns one secondary host process and its channel."""

    def __init__(self, endpoint: Endpoint, *, ssh_command: str = "ssh",
                 remote_command: str = "georep-node", handshake_timeout: float = 30.0,
                 max_in_flight: int = 64) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.ssh_command = ssh_command
        self.remote_command = remote_command
        self.handshake_timeout = handshake_timeout
        self.max_in_flight = max_in_flight
        self.process: subprocess.Popen[bytes] | None = None
        self._channel: Channel | None = None
        self.hello: dict[str, Any] = {}
        self._stderr_tail: list[str] = []

    def _argv(self) -> list[str]:
        if self.endpoint.is_local:
            return local_host_argv(self.endpoint.path)
        return ssh_host_argv(self.endpoint, ssh_command=self.ssh_command,
                             remote_command=self.remote_command)

    def _on_stderr(self, line: bytes) -> None:
        text = line.decode("utf-8", "backslashreplace").rstrip()
        if text:
            self._stderr_tail = [*self._stderr_tail[-4:], text]
            remote_log.info("remote: %s", text)

    def connect(self) -> dict[str, Any]:
        """Start the secondary host and shake hands; returns the host's hello."""
        argv = self._argv()
        log.debug("starting secondary host: %s", argv)
        try:
            self.process, self._channel = spawn_local(
                argv, stderr_handler=self._on_stderr, max_in_flight=self.max_in_flight)
        except OSError as e:
            raise ConnectError(f"cannot start {argv[0]!r}: {e.strerror}")
        try:
            self.hello = self._channel.handshake(self.handshake_timeout)
        except Exception as e:
            reason = str(e)
            self._close()
            if self._stderr_tail:
                reason += f" (secondary said: {self._stderr_tail[-1]})"
            raise ConnectError(reason)
        return self.hello

    def channel(self) -> Channel:
        """The connected channel (thread-safe; use it directly from any actor)."""
        if self._channel is None:
            raise ConnectError("not connected")
        return self._channel

    def stats(self) -> dict[str, Any]:
        """Frames and bytes moved, and the host's pid."""
        out: dict[str, Any] = dict(self._channel.stats()) if self._channel else {}
        out["pid"] = self.process.pid if self.process else None
        return out

    def _close(self) -> None:
        if self._channel is not None:
            try:
                self._channel.close()
            except Exception:  # closing a dead channel must not mask the real error
                log.debug("closing channel failed", exc_info=True)
            self._channel = None
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def on_stop(self) -> None:
        self._close()

    def on_failure(self, *exc_info: Any) -> None:
        self._close()
