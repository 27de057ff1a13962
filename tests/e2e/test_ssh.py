"""Remote secondaries over a real sshd: sync, one-line errors, restricted keys, the
session lock and reconnecting after the ssh process dies.  Nothing is mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e.helpers import wait_for
from tests.support.compare import compare_trees
from tests.support.sshd import (
    REMOTE_COMMAND,
    REPO,
    SshServer,
    keygen,
    spare_port,
    ssh_connection_child,
    sshd_missing,
    start_sshd,
)
from tests.support.treegen import apply_changes, make_tree
from transport import LockedError, spawn_local
from transport.endpoint import cpu_has_aes, local_host_argv

GEOREP = [sys.executable, str(REPO / "bin" / "georep-node")]


def run(*args: str | os.PathLike[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``georep-node ARGS`` as a user runs it."""
    return subprocess.run([*GEOREP, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ssh_sync(sshd: SshServer, primary: Path, secondary: str, *extra: str,
             key: Path | None = None, port: int | None = None,
             remote_command: str = REMOTE_COMMAND) -> subprocess.CompletedProcess[str]:
    return run("sync", primary, secondary, "--once", "--json",
               "--ssh-command", sshd.ssh_command(key, port),
               "--remote-command", remote_command, *extra)


def scp_spec(sshd: SshServer, path: Path) -> str:
    return f"{sshd.user}@{sshd.host}:{path}"


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("georep-node sync: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated ~3000-entry tree, shared read-only by the tests that do not change it."""
    root = tmp_path_factory.mktemp("ssh") / "primary"
    make_tree(root, entries=3000, big_sparse=False, big_dir_files=1000)
    return root


def test_sync_over_ssh_converges_in_one_connection(sshd: SshServer, tmp_path: Path) -> None:
    primary, secondary = tmp_path / "p", tmp_path / "s"
    make_tree(primary, entries=3000, big_sparse=False, big_dir_files=1000)
    before = sshd.accepted()
    proc = ssh_sync(sshd, primary, scp_spec(sshd, secondary))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"]
    assert compare_trees(primary, secondary) == []
    assert sshd.accepted() == before + 1  # one long-lived connection per run

    apply_changes(primary)
    # The URL form, with the port in the URL instead of in --ssh-command.
    url = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{secondary}"
    proc = run("sync", primary, url, "--once", "--json", "--ssh-command",
               f"ssh -F /dev/null -i {sshd.client_key} -o StrictHostKeyChecking=no "
               "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
               "--remote-command", REMOTE_COMMAND)
    assert proc.returncode == 0, proc.stderr
    assert compare_trees(primary, secondary) == []
    assert sshd.accepted() == before + 2


def test_unreachable_host(sshd: SshServer, tree: Path, tmp_path: Path) -> None:
    line = one_line_error(ssh_sync(sshd, tree, scp_spec(sshd, tmp_path / "s"),
                                   port=spare_port()))
    assert "cannot reach secondary host 127.0.0.1" in line
    assert "Connection refused" in line


def test_authentication_refused(sshd: SshServer, tree: Path, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    line = one_line_error(ssh_sync(sshd, tree, scp_spec(sshd, tmp_path / "s"), key=stranger))
    assert "ssh authentication to root@127.0.0.1 refused" in line
    assert "Permission denied" in line


def test_georep_missing_on_secondary(sshd: SshServer, tree: Path, tmp_path: Path) -> None:
    line = one_line_error(ssh_sync(sshd, tree, scp_spec(sshd, tmp_path / "s"),
                                   remote_command="/nonexistent/georep-node"))
    assert "georep-node is not installed on 127.0.0.1" in line
    assert "--remote-command" in line


def test_login_banner_is_reported(sshd: SshServer, tree: Path, tmp_path: Path) -> None:
    line = one_line_error(ssh_sync(sshd, tree, scp_spec(sshd, tmp_path / "s"),
                                   remote_command=f"echo hello; exec {REMOTE_COMMAND}"))
    assert "junk on stdout before the handshake" in line
    assert "hello" in line


def test_missing_root(sshd: SshServer, tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "nope" / "deeper" / "root"
    line = one_line_error(ssh_sync(sshd, tree, scp_spec(sshd, root)))
    assert f"secondary root {root} does not exist" in line
    assert not (tmp_path / "nope").exists()


def test_root_not_a_directory(sshd: SshServer, tree: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    line = one_line_error(ssh_sync(sshd, tree, scp_spec(sshd, tmp_path / "file")))
    assert "is not a directory" in line


def test_restricted_key(sshd: SshServer, tree: Path, tmp_path: Path) -> None:
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    key = tmp_path / "keys" / "georep_ed25519"
    proc = run("ssh-key", "--key", key, "--generate", "--root", allowed,
               "--remote-command", REMOTE_COMMAND)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith('restrict,command="') and " ssh-ed25519 AAAA" in line, line
    assert f"secondary --restrict-root {allowed}" in line
    sshd.restricted_keys.write_text(line + "\n")
    try:
        # Any other command fails and prints nothing of its own.
        shell = subprocess.run([*sshd.ssh_command(key).split(), "-oBatchMode=yes",
                                f"{sshd.user}@{sshd.host}", "id"],
                               capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
        assert shell.returncode != 0
        assert "uid=" not in shell.stdout
        assert "may only run" in shell.stderr

        refused = one_line_error(ssh_sync(sshd, tree, scp_spec(sshd, other), key=key))
        assert f"restricted to secondary root {allowed}" in refused
        assert not other.exists()

        proc = ssh_sync(sshd, tree, scp_spec(sshd, allowed), key=key)
        assert proc.returncode == 0, proc.stderr
        assert compare_trees(tree, allowed) == []
    finally:
        sshd.restricted_keys.write_text("")


def test_session_lock(sshd: SshServer, tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "locked"
    # Session A: a secondary host started by hand, with a short timeout (heartbeat 1 s).
    argv = [*local_host_argv(str(root)), "--timeout", "4"]
    holder, chan = spawn_local(argv, stderr_handler=lambda _line: None)
    stop = threading.Event()

    def keep_alive() -> None:  # as RemoteProxy does, so the idle timeout does not end A
        while not stop.wait(0.5) and not chan.closed:
            try:
                chan.call("ping", timeout=10)
            except Exception:
                return

    try:
        chan.handshake(30, identity={"session": "A", "host": "host-a", "primary": "/pa"})
        threading.Thread(target=keep_alive, daemon=True).start()
        record = json.loads((root / ".georep" / "lock").read_text())
        assert (record["session"], record["pid"]) == ("A", holder.pid)

        line = one_line_error(ssh_sync(sshd, tree, scp_spec(sshd, root), "--session", "B"))
        assert "is locked by session A from host host-a (primary /pa) since 20" in line
        assert holder.poll() is None

        # --force takes it over; the old holder notices on its next heartbeat and exits.
        proc = ssh_sync(sshd, tree, scp_spec(sshd, root), "--session", "B", "--force")
        assert proc.returncode == 0, proc.stderr
        assert compare_trees(tree, root) == []
        assert holder.wait(timeout=30) == 3
    finally:
        stop.set()
        chan.close()
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)
    # After the holder is gone, a third session gets the lock as usual.
    proc = ssh_sync(sshd, tree, scp_spec(sshd, root), "--session", "C")
    assert proc.returncode == 0, proc.stderr


def test_lock_refused_error_type(tmp_path: Path) -> None:
    root = tmp_path / "r"
    first, c1 = spawn_local(local_host_argv(str(root)), stderr_handler=lambda _line: None)
    second, c2 = spawn_local(local_host_argv(str(root)), stderr_handler=lambda _line: None)
    try:
        c1.handshake(30, identity={"session": "A"})
        with pytest.raises(LockedError, match="locked by session A"):
            c2.handshake(30, identity={"session": "B"})
        assert second.wait(timeout=30) == 2
    finally:
        c1.close()
        c2.close()
        for p in (first, second):
            p.wait(timeout=30)


def _moved(secondary: Path) -> bool:
    try:
        return len(os.listdir(secondary)) > 3
    except FileNotFoundError:
        return False


def test_reconnect_after_ssh_is_killed(sshd: SshServer, tree: Path, tmp_path: Path) -> None:
    secondary = tmp_path / "s"
    sync = subprocess.Popen(
        [*GEOREP, "sync", str(tree), scp_spec(sshd, secondary), "--once", "--json",
         "--ssh-command", sshd.ssh_command(), "--remote-command", REMOTE_COMMAND,
         # ~46 MB at 16 MiB/s: the run lasts seconds, so the kill lands mid-run however
         # fast the machine (or georep) is.
         "--bwlimit", "16M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: _moved(secondary) or sync.poll() is not None, 120,
                 "the first data on the secondary")
        assert sync.poll() is None, "the sync ended before the ssh could be killed"
        # Looked up once data moves: earlier, the only ssh child may be the ``ssh -G``
        # configuration probe, which is gone by now.
        ssh = wait_for(lambda: ssh_connection_child(sync.pid), 60, "the ssh child of the sync")
        ssh.send_signal(signal.SIGKILL)
        out, err = sync.communicate(timeout=300)
    finally:
        if sync.poll() is None:
            sync.kill()
            sync.communicate(timeout=30)
    assert sync.returncode == 0, err
    assert "reconnecting" in err
    assert json.loads(out)["counters"]["reconnects"] == 1
    assert compare_trees(tree, secondary) == []


def _negotiated(log: Path) -> list[str]:
    """The client->server ciphers sshd agreed on (its DEBUG1 ``kex:`` lines)."""
    return [line.split("cipher:", 1)[1].split()[0] for line in log.read_text().splitlines()
            if "kex: client->server cipher:" in line]


@pytest.mark.skipif(sshd_missing() is not None or not cpu_has_aes(),
                    reason="needs a real sshd and a CPU with AES instructions")
@pytest.mark.parametrize(("server_ciphers", "client_option", "expected"), [
    ("", "", "aes128-gcm@openssh.com"),  # nobody chose: georep puts AES-GCM first
    ("Ciphers chacha20-poly1305@openssh.com\n", "", "chacha20-poly1305@openssh.com"),
    ("", " -c aes256-ctr", "aes256-ctr"),  # the user chose: georep adds nothing
])
def test_cipher_negotiated(tmp_path: Path, server_ciphers: str, client_option: str,
                           expected: str) -> None:
    primary, secondary = tmp_path / "p", tmp_path / "s"
    make_tree(primary, entries=200, big_sparse=False, big_dir_files=0)
    with start_sshd(tmp_path / "sshd", extra_config=f"LogLevel DEBUG1\n{server_ciphers}") as srv:
        proc = run("sync", primary, scp_spec(srv, secondary), "--once", "--json",
                   "--ssh-command", srv.ssh_command() + client_option,
                   "--remote-command", REMOTE_COMMAND)
        assert proc.returncode == 0, proc.stderr
        assert compare_trees(primary, secondary) == []
        assert _negotiated(srv.log) == [expected]


def test_secondary_exits_after_silence(tmp_path: Path) -> None:
    argv = [*local_host_argv(str(tmp_path / "r")), "--timeout", "1"]
    lines: list[bytes] = []
    host, chan = spawn_local(argv, stderr_handler=lines.append)
    try:
        chan.handshake(30, identity={"session": "quiet"})
        assert host.wait(timeout=30) == 2
        wait_for(lambda: any(b"no request from the primary for 1 s" in ln for ln in lines),
                 10, "the host's exit line")
    finally:
        chan.close()


def test_remote_proxy_pings_when_idle(tmp_path: Path) -> None:
    from actors.remote import RemoteProxy
    from transport.endpoint import parse_secondary

    ref = RemoteProxy.start(parse_secondary(str(tmp_path / "r")), ping_interval=0.2)
    try:
        proxy = ref.proxy()
        proxy.connect().get(timeout=60)
        chan = proxy.channel().get(timeout=10)
        sent = chan.frames_sent
        wait_for(lambda: chan.frames_sent >= sent + 3, 30, "three pings")
        assert not chan.closed
    finally:
        ref.stop()
