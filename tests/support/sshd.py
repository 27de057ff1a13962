"""A real OpenSSH server on 127.0.0.1 for end-to-end tests (no mocks).

:func:`start_sshd` runs ``/usr/sbin/sshd -D -e -f CONFIG`` on a spare port with its own
host key, and authorizes a client key it generates.  Two authorized_keys files are
read: ``authorized_keys`` (the client key, unrestricted) and ``authorized_keys2``
(empty; tests put restricted lines there).  :attr:`SshServer.ssh_command` is what a
client passes as ``--ssh-command``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
REPO = Path(__file__).resolve().parents[2]
#: How the tests run georep-node on the "remote" host: this interpreter, this checkout.
REMOTE_COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'bin' / 'georep-node'))}"


def spare_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> Path:
    """Create an ed25519 key pair without passphrase at ``path``; returns ``path``."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "georep-test",
                    "-f", str(path)], check=True, stdin=subprocess.DEVNULL, timeout=30)
    return path


@dataclass
class SshServer:
    """A running test sshd and how to reach it."""

    dir: Path
    port: int
    client_key: Path
    authorized_keys: Path
    restricted_keys: Path
    log: Path
    host: str = "127.0.0.1"
    user: str = "root"

    def ssh_command(self, key: Path | None = None, port: int | None = None) -> str:
        """An ``ssh`` command line for this server (``--ssh-command``), no host key checks."""
        return (f"ssh -F /dev/null -i {key or self.client_key} -p {port or self.port} "
                "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                "-o LogLevel=ERROR -o IdentitiesOnly=yes")

    def accepted(self) -> int:
        """How many sessions sshd has authenticated so far (from its log)."""
        return self.log.read_text(errors="replace").count("Accepted publickey")


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {port} within {timeout} s")


@contextmanager
def start_sshd(workdir: Path, *, timeout: float = 20.0,
               extra_config: str = "") -> Iterator[SshServer]:
    """Run a test sshd in ``workdir`` for the duration of the ``with`` block.

    ``extra_config`` lines go first (sshd keeps the first value of a keyword), e.g.
    ``"LogLevel DEBUG1\n"``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    host_key = keygen(workdir / "ssh_host_ed25519_key")
    client_key = keygen(workdir / "client_key")
    authorized = workdir / "authorized_keys"
    authorized.write_text((workdir / "client_key.pub").read_text())
    restricted = workdir / "authorized_keys2"
    restricted.write_text("")
    port = spare_port()
    config = workdir / "sshd_config"
    config.write_text(f"""{extra_config}\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {authorized} {restricted}
PrintMotd no
LogLevel INFO
MaxStartups 50
""")
    log = workdir / "sshd.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf)
    try:
        _wait_port(port, proc, log, timeout)
        yield SshServer(workdir, port, client_key, authorized, restricted, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def sshd_missing() -> str | None:
    """Why a real sshd cannot run here, or None."""
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed (Debian package openssh-server; scripts/setup.sh)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "the OpenSSH client is not installed (Debian package openssh-client)"
    return None


def ssh_connection_child(pid: int) -> psutil.Process | None:
    """The ``ssh`` child of process ``pid`` that carries the session, or None.

    A sync may also run a short-lived ``ssh -G`` (it reads the configuration, connects to
    nothing; see transport.endpoint.cipher_options): that one is never the answer, so a
    test that kills "the ssh" kills the connection and not the probe.
    """
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for k in kids:
        try:
            if k.name() == "ssh" and "-G" not in k.cmdline() and k.status() != psutil.STATUS_ZOMBIE:
                return k
        except psutil.Error:
            continue
    return None
