"""Where the secondary is and the command line that starts its host process.

A secondary is a local path (``/srv/replica``), ``[user@]host:/path`` or
``ssh://[user@]host[:port]/path``.  Local or remote, the primary talks to the same
``georep-node secondary --root PATH`` host over its stdio; ssh is only another way to
start that process.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
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
    return [*argv, *cipher_options(tuple(argv), ep.host or "")]


#: OpenSSH's own client cipher list (unchanged since 6.9; 9.x still ships it).
OPENSSH_DEFAULT_CIPHERS = ("chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,"
                           "aes128-gcm@openssh.com,aes256-gcm@openssh.com")
#: The same six ciphers, AES-GCM first: what georep asks for on a CPU with AES instructions.
AES_FIRST_CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,"
                     "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr")


def cpu_has_aes(cpuinfo: str | None = None) -> bool:
    """True when this CPU has AES instructions (x86 ``aes`` flag, arm64 ``aes`` feature)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return "aes" in value.split()
    return False


def choose_ciphers(configured: str | None, has_aes: bool) -> tuple[str, ...]:
    """The ``-oCiphers`` option to add, given what ``ssh -G`` reports: none or one.

    Only when nobody chose ciphers (ssh's effective list is OpenSSH's own default: no
    ``-c`` in ``--ssh-command``, no ``Ciphers`` in any ssh_config or crypto policy) and
    the CPU has AES instructions: then the same six ciphers are offered with AES-GCM
    first.  The set offered is unchanged, so a server that allows only
    chacha20-poly1305 still agrees on it.
    """
    if has_aes and configured == OPENSSH_DEFAULT_CIPHERS:
        return (f"-oCiphers={AES_FIRST_CIPHERS}",)
    return ()


@functools.lru_cache(maxsize=8)
def cipher_options(argv: tuple[str, ...], host: str) -> tuple[str, ...]:
    """``choose_ciphers`` for this ssh command line and host (``ssh -G``: no connection).

    OpenSSH's default, chacha20-poly1305, is the better choice only without AES
    instructions; with them, AES-GCM costs the ssh client and sshd about a third less
    CPU per byte, which on a small host is most of the cost of a large transfer
    (BENCHMARKS.md, "What bounds georep over ssh").  A client that is not ``ssh`` itself
    (a wrapper script might connect when given ``-G``) and any failure of ``ssh -G``
    leave ssh's choice alone.
    """
    if not host or not argv or os.path.basename(argv[0]) != "ssh" or not cpu_has_aes():
        return ()
    try:
        out = subprocess.run([*argv, "-G", "--", host], capture_output=True, text=True,
                             timeout=5, stdin=subprocess.DEVNULL, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    configured = next((line.split(None, 1)[1] for line in out.splitlines()
                       if line.startswith("ciphers ") and " " in line), None)
    return choose_ciphers(configured, True)


def session_ssh_command(ssh_command: str, *, compress: bool = False) -> str:
    """The ssh client and options a session uses (``--compress`` adds ``-C``)."""
    return f"{ssh_command} -C" if compress else ssh_command


def ssh_host_argv(ep: Endpoint, *, ssh_command: str = "ssh",
                  remote_command: str = "georep-node") -> list[str]:
    """argv that starts the secondary host on ``ep.host`` over OpenSSH (see ssh_base_argv)."""
    return [*ssh_base_argv(ep, ssh_command=ssh_command), "--", ep.host or "",
            remote_host_command(ep.path, remote_command=remote_command)]
