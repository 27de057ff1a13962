"""Where the secondary is and the command line that starts its host process.

A secondary is a local path (``/srv/replica``), ``[user@]host:/path`` or
``ssh://[user@]host[:port]/path``.  Local or remote, the primary talks to the same
``georep-node secondary --root PATH`` host over its stdio; ssh is only another way to
start that process.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:\[\]]+|\[[^\]]+\]):(?P<path>.*)$")
_URL = re.compile(
    r"^ssh://(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:\[\]]+|\[[^\]]+\])(?::(?P<port>\d+))?(?P<path>/.*)$")


class EndpointError(ValueError):
    """The secondary spec cannot be understood."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed secondary."""

    path: str
    host: str | None = None
    user: str | None = None
    port: int | None = None

    @property
    def is_local(self) -> bool:
        """True when the secondary is a directory on this machine."""
        return self.host is None

    def __str__(self) -> str:
        if self.host is None:
            return self.path
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.host}{port}{self.path}"


def parse_secondary(spec: str) -> Endpoint:
    """Parse a secondary spec; a plain path (even with a ``:`` after a ``/``) is local."""
    if not spec:
        raise EndpointError("empty secondary")
    m = _URL.match(spec)
    if m:
        return Endpoint(m["path"], m["host"].strip("[]"), m["user"],
                        int(m["port"]) if m["port"] else None)
    if spec.startswith(("/", ".")) or "/" in spec.split(":", 1)[0]:
        return Endpoint(spec)
    m = _SCP_LIKE.match(spec)
    if m:
        if not m["path"]:
            raise EndpointError(f"secondary {spec!r} has no path after ':'")
        return Endpoint(m["path"], m["host"].strip("[]"), m["user"])
    return Endpoint(spec)


_BIN = Path(__file__).resolve().parent.parent / "bin" / "georep-node"


def georep_argv() -> list[str]:
    """argv prefix that runs this very ``georep-node`` (same interpreter, same code)."""
    if _BIN.is_file():
        return [sys.executable, str(_BIN)]
    return [sys.executable, "-m", "actors.cli"]


def local_host_argv(path: str) -> list[str]:
    """argv of a secondary host on this machine, with this interpreter and this code."""
    if _BIN.is_file():
        return [sys.executable, str(_BIN), "secondary", "--root", path]
    return [sys.executable, "-m", "actors.cli", "secondary", "--root", path]


def remote_host_command(path: str, *, remote_command: str = "georep-node") -> str:
    """The shell command line run on the remote host: ``remote_command`` is used verbatim.

    ssh hands its command to the remote user's shell as one string, so the path is
    quoted here and ``remote_command`` may be any shell text (``sudo georep-node``,
    ``/opt/venv/bin/python -m actors.cli``).
    """
    return f"{remote_command} secondary --root {shlex.quote(path)}"


def ssh_base_argv(ep: Endpoint, *, ssh_command: str = "ssh") -> list[str]:
    """The ssh client, its options and georep's, port and user: everything but the host.

    BatchMode: never prompt (a prompt would hang a daemon); ConnectTimeout: fail fast on
    an unreachable host; ServerAliveInterval: notice a dead network path.  Options in
    ``ssh_command`` come first, and OpenSSH keeps the first value it is given.  The data
    engines (rsync ``-e``, tarssh) use the same prefix as the protocol connection.
    """
    argv = shlex.split(ssh_command)
    argv += ["-T", "-oBatchMode=yes", "-oConnectTimeout=15", "-oServerAliveInterval=15",
             "-oServerAliveCountMax=4"]
    if ep.port:
        argv += ["-p", str(ep.port)]
    if ep.user:
        argv += ["-l", ep.user]
    return argv


def session_ssh_command(ssh_command: str, *, compress: bool = False) -> str:
    """The ssh client and options a session uses (``--compress`` adds ``-C``)."""
    return f"{ssh_command} -C" if compress else ssh_command


def ssh_host_argv(ep: Endpoint, *, ssh_command: str = "ssh",
                  remote_command: str = "georep-node") -> list[str]:
    """argv that starts the secondary host on ``ep.host`` over OpenSSH (see ssh_base_argv)."""
    return [*ssh_base_argv(ep, ssh_command=ssh_command), "--", ep.host or "",
            remote_host_command(ep.path, remote_command=remote_command)]
